"""The sweep report from a summary: the verdict against the validation set's resolution, the plot."""

from __future__ import annotations

import base64

import pytest

from tl_ray.tuning import report
from tl_ray.tuning.sweep import SweepSummary, TrialSummary


def trial(trial_id: str, depth: int, strategy: str, val_acc: float, status: str = "finished", epochs: int = 4):
    history = [{"epoch": e, "val_acc": val_acc * e / epochs, "val_loss": 1.0 / e} for e in range(1, epochs + 1)]
    return TrialSummary(
        trial_id, depth, strategy, 3e-3, status, epochs, val_acc, 0.5, epochs, 10.0, 100.0, f"/c/{trial_id}", history
    )


def summary(*trials, val_images: int = 150) -> SweepSummary:
    return SweepSummary("/runs/sweep", 4, list(trials), 60.0, None, val_images, 3)


def test_one_image_is_the_finest_resolution_and_two_standard_errors_the_usual_one():
    assert report.resolution(1.0, 150) == pytest.approx(1 / 150)
    assert report.resolution(0.9, 150) == pytest.approx(2 * (0.9 * 0.1 / 150) ** 0.5)
    assert report.resolution(0.9, 0) == 0.0


def test_a_lead_larger_than_the_resolution_names_the_winner_and_the_transfer_gain():
    lines = report.verdict(
        summary(
            trial("a", 3, "discriminative", 0.96),
            trial("b", 5, "plain", 0.86, status="stopped early", epochs=2),
            trial("c", 0, report.SCRATCH, 0.42),
        )
    )
    assert lines[0] == "- validation set: 150 images; one image = 0.007 of val_acc; chance = 0.333"
    assert lines[1].startswith(
        "- **best: depth 3, discriminative** at 0.960, ahead of depth 5 (0.860) by 0.100 (15 images)"
    )
    assert lines[2] == "- clearly behind the best, by more than the resolution: depth 5 (0.860, 15 images behind)"
    assert lines[3] == "- **transfer vs from scratch**: 0.960 vs 0.420 (+0.540, +81 images)"


def test_gaps_within_the_resolution_name_no_winner():
    lines = report.verdict(
        summary(
            trial("a", 3, "discriminative", 0.96), trial("b", 0, "discriminative", 0.94), trial("c", 5, "plain", 0.70)
        )
    )
    assert "no clear winner" in lines[1]
    assert "depth 3, discriminative, depth 0, discriminative are within 0.0" in lines[1]
    assert "depth 5" not in lines[1]
    assert lines[2] == "- clearly behind the best, by more than the resolution: depth 5 (0.700, 39 images behind)"


def test_report_files_show_strategy_baseline_and_asha_stops(tmp_path):
    result = summary(
        trial("a", 3, "discriminative", 0.96),
        trial("b", 5, "plain", 0.5, status="stopped early", epochs=2),
        trial("c", 0, report.SCRATCH, 0.42),
    )
    paths = report.write_report(result, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "| depth 3, discriminative | 0.960 | 0.000 (0 images) |" in markdown
    assert "| from scratch | 0.420 | 0.540 (81 images) |" in markdown
    assert "- b (depth 5, lr 3.00e-03) after epoch 2" in markdown
    csv_lines = paths["csv"].read_text().splitlines()
    assert csv_lines[0].startswith("trial_id,freeze_depth,strategy,lr,val_acc")
    assert csv_lines[1].startswith("a,3,discriminative,0.003,0.96")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text(encoding="utf-8")  # the same report as one page, the plot embedded
    assert "<strong>best: depth 3, discriminative</strong> at 0.960" in page
    assert base64.b64encode(paths["plot"].read_bytes()).decode() in page
    assert '<td>from scratch</td><td class="number">0.420</td><td class="number">0.540</td>' in page
    assert "Stopped early by ASHA: b after epoch 2." in page


def test_a_sweep_with_trials_neither_ended_nor_failed_was_interrupted():
    from tl_ray.tuning.sweep import was_interrupted

    assert not was_interrupted(summary(trial("a", 3, "plain", 0.9), trial("b", 5, "plain", 0.8, status="error")))
    assert was_interrupted(summary(trial("a", 3, "plain", 0.9), trial("b", 5, "plain", 0.0, status="incomplete")))


def test_a_trials_images_per_second_leaves_out_its_first_epoch_when_it_has_others():
    from tl_ray.tuning.sweep import _steady_rate

    assert _steady_rate([{"images_per_s": 50.0}, {"images_per_s": 200.0}, {"images_per_s": 220.0}]) == 210.0
    assert _steady_rate([{"images_per_s": 50.0}]) == 50.0
