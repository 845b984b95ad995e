"""What the CLI prints when a command ends: the outcome of a run, a sweep, an evaluation, an inspection, an export.
The tables printed while a run goes are ``console``'s."""

from __future__ import annotations

import math
import unicodedata


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: East Asian wide and full-width characters (猫, ｃａｔ, most emoji) two,
    combining marks and zero-width characters none, the rest one. ``len`` counts code points, which misaligns a
    table of class names in any of those scripts."""
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` terminal columns (``f"{text:<width}"`` by display width, not length)."""
    return text + " " * max(0, width - display_width(text))


def train_result(result, rows_printed: int) -> None:
    """The run's outcome; its epochs too when none were printed as they ended (a run resumed after its last)."""
    from tl_ray.cli.console import EPOCH_HEADER, epoch_row

    if not rows_printed:
        print(EPOCH_HEADER)
        for row in result.history:
            print(epoch_row(row, len(result.history), 0.0))
    print()
    if result.monitor != "val_acc":
        print(f"best {result.monitor:<11} {result.metrics[result.monitor]:.3f} (epoch {result.metrics['epoch']})")
        print(f"val_acc          {result.metrics['val_acc']:.3f} (that epoch)")
    else:
        print(f"best val_acc     {result.metrics['val_acc']:.3f} (epoch {result.metrics['epoch']})")
    recall = result.metrics.get("val_recall") or {}
    if recall:
        lowest = sorted(recall.items(), key=lambda item: math.inf if item[1] is None else item[1])
        shown = ", ".join(f"{name} {'-' if value is None else f'{value:.3f}'}" for name, value in lowest[:10])
        more = f"; {len(lowest) - 10} more in result.json" if len(lowest) > 10 else ""
        print(f"val recall       {shown} (lowest first{more})")
    if result.stopped_early:
        print(f"stopped early    after epoch {result.history[-1]['epoch']}: {result.stopped_early}")
    print(f"best checkpoint  {result.best_checkpoint}")
    print(f"run folder       {result.run_dir} (result.json, report.html)")
    print(f"tensorboard      {result.tensorboard}")
    print(f"skipped files    {len(result.skipped_files)}")
    for item in result.skipped_files[:20]:
        print(f"  {item['path']}: {item['reason']}")
    if len(result.skipped_files) > 20:
        print(f"  ... and {len(result.skipped_files) - 20} more, listed in result.json")


def lr_finding(finding) -> None:
    curve = finding.curve
    how = "the loss diverged" if curve.stopped == "diverged" else "it reached --end-lr"
    print(f"suggested lr     {finding.suggestion:.2e} (valley; pass it to train as --lr, or use --lr auto)")
    print(f"range test       {len(curve.lrs)} steps, {curve.lrs[0]:.1e} to {curve.lrs[-1]:.1e} ({how})")
    print(f"plot             {finding.plot}")
    print(f"curve            {finding.json}")


def sweep(summary, written: dict[str, str]) -> None:
    from tl_ray.tuning.report import table, verdict

    print()
    print(table(summary))
    print()
    best = summary.best
    for line in verdict(summary):
        print(line.removeprefix("- ").replace("**", ""))
    if best is not None:
        score = "" if summary.monitor == "val_acc" else f" {summary.monitor} {getattr(best, summary.monitor):.3f},"
        print(
            f"best trial       freeze depth {best.freeze_depth}, {best.strategy},"
            + "".join(f" {key} {value}," for key, value in best.grid.items())
            + f" lr {best.lr:.2e}:{score}"
            f" val_acc {best.val_acc:.3f}"
        )
        print(f"best checkpoint  {summary.best_checkpoint or best.checkpoint}")
    print(f"report           {written['markdown']}")
    print(f"plot             {written['plot']}")
    print(f"page             {written['html']} (open it in a browser)")
    print(f"results          {written['csv']}")
    print(f"tensorboard      tensorboard --logdir {summary.run_dir}")


def evaluation(evaluation, out: str | None) -> None:
    metrics = evaluation.metrics
    print(f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for name, row in metrics["per_class"].items():
        print(f"{pad(name, 20)} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} {row['support']:>8}")
    macro = metrics["macro"]
    print(
        f"{'macro':<20} {macro['precision']:>9.3f} {macro['recall']:>7.3f} {macro['f1']:>6.3f} {metrics['images']:>8}"
    )
    print()
    print(f"accuracy         {metrics['accuracy']:.4f} on {metrics['images']} images")
    print(f"misclassified    {len(evaluation.misclassified)}")
    if metrics["undecodable"]:
        print(f"undecodable      {len(metrics['undecodable'])}")
    if metrics.get("unreadable"):
        print(f"unreadable       {len(metrics['unreadable'])} (the storage did not deliver them: not scored)")
    calibration = metrics["calibration"]
    print(f"calibration      ECE {calibration['ece']:.4f} ({calibration['bins']} confidence bins)")
    print(f"mean loss        {metrics['log_loss']:.4f}" + ("" if metrics["loss_exact"] else " (a lower bound)"))
    pairs = metrics["most_confused"]
    if pairs:
        print("most confused    (true -> predicted: images)")
        for pair in pairs[:5]:
            print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")
        if len(pairs) > 5:
            print(f"  ... {len(pairs) - 5} more pairs in metrics.json")
    if out:
        print(f"written to       {out}/report.html (open it in a browser)")
        print("                 metrics.json, misclassified.csv, confusion.png, per_class.png, reliability.png,")
        print(f"                 top_losses.png (the {len(metrics['top_losses'])} images with the highest loss)")


def inspection(found) -> None:
    from tl_ray.inputs.inspect import size_summary

    print(f"data             {found.data}")
    print(f"source           {found.source}")
    print(f"validation       {found.val_rule}")
    train, val, test = found.counts["train"], found.counts["val"], found.counts.get("test")
    print(f"classes          {len(found.class_names)} (in this order; the checkpoint records it)")
    print(f"  {'class':<24} {'train':>8} {'val':>8}" + (f" {'test':>8}" if test else ""))
    for name in found.class_names:
        print(f"  {pad(name, 24)} {train[name]:>8} {val[name]:>8}" + (f" {test[name]:>8}" if test else ""))
    total = f"  {'total':<24} {sum(train.values()):>8} {sum(val.values()):>8}"
    print(total + (f" {sum(test.values()):>8}" if test else ""))
    low = min(train, key=train.get)
    print(f"imbalance        {found.imbalance:.1f}x (largest training class over the smallest, {low})")
    what = "decoded every item" if found.decoded else "the listing's checks; --decode decodes every item"
    print(f"skipped          {len(found.skipped)} ({what})")
    for shown, reason in found.skipped[:20]:
        print(f"  {shown}: {reason}")
    if len(found.skipped) > 20:
        print(f"  ... and {len(found.skipped) - 20} more")
    if found.unreadable:
        print(f"unreadable       {len(found.unreadable)} (the storage did not deliver them: not bad; rerun later)")
        for shown, reason in found.unreadable[:5]:
            print(f"  {shown}: {reason}")
    for note in found.notes:
        print(f"note             {note}")
    sizes = found.sizes
    print(
        f"image sizes      width {size_summary(sizes['width'])}, height {size_summary(sizes['height'])}"
        f" (min / median / max of {len(sizes['width'])} of {found.sampled} {'items' if found.decoded else 'sampled'})"
    )


def export_result(result) -> None:
    from tl_ray.inference.export import METADATA_KEY

    meta = result.metadata
    size, resize, names = meta["image_size"], meta["resize_size"], meta["class_names"]
    print(f"wrote {result.format} {result.path} ({result.size / 1e6:.1f} MB)")
    print(f"input            {meta['input']['name']}: uint8 RGB (N, 3, {size}, {size}), values 0-255")
    filter_name = meta.get("interpolation", "bilinear")
    print(f"                 (resize the short side to {resize}, {filter_name}; centre-crop {size}: not in the file)")
    print(f"output           {meta['output']['name']}: float32 (N, {len(names)}), softmax over {', '.join(names)}")
    print(f"metadata         {result.sidecar} (also inside the file: {METADATA_KEY})")


def archs(rows: list[tuple[str, str, bool]]) -> None:
    """`tl-ray archs`: one backbone a line, its library and whether --weights imagenet has weights for it."""
    if not rows:
        print("no architecture matches (tl-ray archs with no pattern lists them all)")
        return
    width = max(len(name) for name, _, _ in rows)
    print(f"{'arch':<{width}}  library      pretrained")
    for name, library, pretrained in rows:
        print(f"{name:<{width}}  {library:<11}  {'yes' if pretrained else '-'}")
    with_weights = sum(pretrained for _, _, pretrained in rows)
    print(f"{len(rows)} architectures, {with_weights} with pretrained weights")


def audit(result) -> None:
    """`tl-ray audit`: what was audited, each finding's count and its worst few, and where the files are."""
    images = ", ".join(f"{count} {split}" for split, count in result.images.items())
    print(f"audited          {sum(result.images.values())} images ({images}) of {result.data}")
    for note in result.notes:
        print(f"note             {note}")
    if result.suspects is not None:
        print()
        print(f"label suspects   {result.suspects.count} (given label unlikely out of sample; lowest score first)")
        for row in result.suspects.top():
            print(f"  {row['item']}: {row['given']} -> {row['suggested']} (score {row['score']:.3f})")
    print()
    leaks = f", {result.leaks} across splits (leaks)" if result.leaks else ""
    print(f"duplicates       {result.duplicates.count} pairs{leaks} (cosine >= {result.duplicate_threshold})")
    for row in result.duplicates.top():
        exact = ", same bytes" if row["exact"] else ""
        print(f"  {row['kind']}: {row['a']} = {row['b']} ({row['similarity']:.3f}{exact})")
    print()
    print(f"outliers         {result.outliers.count} (far from every class; farthest first)")
    for row in result.outliers.top():
        print(f"  {row['item']}: nearest {row['nearest']}, distance {row['distance']:.3f} (z {row['z']:.1f})")
    print()
    for finding in result.findings:
        files = ", ".join(name for name in (finding.table, finding.gallery) if name)
        print(f"{finding.name:<16} {files}")
    if result.fix_list:
        print(f"fix list         {result.fix_list} (train --data takes it)")
    if result.report:
        print(f"page             {result.report}")
    if result.skipped:
        print(f"skipped          {len(result.skipped)} items could not be decoded")
        for shown, reason in result.skipped[:5]:
            print(f"  {shown}: {reason}")
