"""The sweep's ASHA, decision by decision, on the results a sweep's trials report (no Ray cluster: the scheduler
decides from the results alone)."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from tl_ray.tuning.sweep import _BaselineKeepingASHA

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def scheduler(max_epochs: int = 2) -> _BaselineKeepingASHA:
    return _BaselineKeepingASHA(
        time_attr="epoch",
        metric="best_val_acc",
        mode="max",
        max_t=max_epochs,
        grace_period=1,
        reduction_factor=2,
        stop_last_trials=False,
    )


def add(asha: _BaselineKeepingASHA, trial_id: str, **point) -> SimpleNamespace:
    trial = SimpleNamespace(trial_id=trial_id, config={"point": {"freeze_depth": 4, "lr": 3e-3, **point}})
    asha.on_trial_add(None, trial)
    return trial


def result(asha: _BaselineKeepingASHA, trial: SimpleNamespace, epoch: int, best_val_acc: float) -> str:
    return asha.on_trial_result(None, trial, {"epoch": epoch, "best_val_acc": best_val_acc})


def test_a_trial_below_the_rung_is_stopped_after_the_grace_epoch():
    asha = scheduler(max_epochs=4)
    gentle, absurd = add(asha, "gentle"), add(asha, "absurd", lr=40.0)
    assert result(asha, gentle, 1, 0.8) == CONTINUE
    assert result(asha, absurd, 1, 0.25) == STOP


def test_no_trial_is_stopped_at_its_last_epoch():
    """ASHA's own rung at the budget would stop the weaker of two trials at their last epoch: it saves nothing and
    kills the trial's Train run before it writes result.json."""
    asha = scheduler(max_epochs=2)
    gentle, weaker = add(asha, "gentle"), add(asha, "weaker")
    assert result(asha, gentle, 1, 0.5) == CONTINUE
    assert result(asha, weaker, 1, 0.5) == CONTINUE  # a tie at the first rung goes on
    assert result(asha, gentle, 2, 0.9) == CONTINUE
    assert result(asha, weaker, 2, 0.6) == CONTINUE
    asha.on_trial_complete(None, gentle, {"epoch": 2, "best_val_acc": 0.9})
    asha.on_trial_complete(None, weaker, {"epoch": 2, "best_val_acc": 0.6})
    later = add(asha, "later")
    assert result(asha, later, 1, 0.1) == STOP, "the rungs still hold the trials that ended"


def test_the_scratch_baseline_is_never_stopped_nor_ranked():
    asha = scheduler(max_epochs=4)
    first, baseline = add(asha, "first"), add(asha, "baseline", weights="none")
    assert result(asha, baseline, 1, 0.01) == CONTINUE
    asha.on_trial_complete(None, baseline, {"epoch": 4, "best_val_acc": 0.01})
    assert result(asha, first, 1, 0.3) == CONTINUE  # the first at the rung: nothing to compare with
    assert result(asha, add(asha, "second"), 1, 0.2) == STOP
