"""The report page's sections: the contact sheet, the feature space, the run, training results."""

from __future__ import annotations

import math
from typing import Any

from dgaug.report.collect import RunView, Training
from dgaug.report.contact import ContactRow, ContactSheet, Tile
from dgaug.report.html import empty, esc, img, page, table
from dgaug.report.projection import Projection
from dgaug.report.retention import Retention

ORIGIN_NAMES = {"real": "real", "edsam": "ED-SAM", "ldfs": "LDFS"}
METRIC_NAMES = {"zero_shot": "zero-shot", "zero_shot_start": "zero-shot (start)", "probe": "probe"}
MAX_FAILED_ROWS = 50


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def _figure(figures: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    return img(figures[name], "image/png", alt, "figure") + (
        f'<p class="note">Also beside this page: <a href="{esc(name)}">{esc(name)}</a></p>'
    )


TILE = 112  # px; a card holds the original and its samples side by side


def _tile(t: Tile, alt: str, caption: str, extra: str = "") -> str:
    picture = (
        img(t.jpeg, "image/jpeg", alt)
        if t.jpeg is not None
        else '<div class="missing">undecodable image</div>'
    )
    return (
        f'<figure{extra} title="{esc(t.key)}">{picture}<figcaption>{caption}</figcaption></figure>'
    )


def _contact_card(r: ContactRow) -> str:
    what = " / ".join(x for x in (r.domain, r.label) if x)
    size = f" · {r.original.size[0]}×{r.original.size[1]}" if r.original.size[0] else ""
    head = f"<b>{esc(what or 'original')}</b><br>{esc(r.key)}{size}"
    tiles = [_tile(r.original, f"original {r.key}", head, ' class="orig"')]
    for t in r.samples:
        cap = f"α {esc(t.alpha)}" if t.alpha else "α not recorded"
        if t.score:
            kind = f' title="{esc(t.score_kind)}"' if t.score_kind else ""
            cap += f"<br><span{kind}>score {esc(t.score)}</span>"
        tiles.append(_tile(t, f"ED-SAM sample {t.key}", cap))
    note = f'<br><span class="note">{esc(r.note)}</span>' if r.note else ""
    caption = f'<p class="caption">“{esc(r.caption)}”{note}</p>'
    return f'<div class="card"><div class="tiles">{"".join(tiles)}</div>{caption}</div>'


def contact_section(sheet: ContactSheet, figures: dict[str, bytes], seed: int) -> str:
    out = ['<section id="augmentations"><h2>Augmentations: originals and their ED-SAM samples</h2>']
    if not sheet.rows:
        out.append(empty(sheet.note or "no source image could be read"))
    else:
        m = max(len(r.samples) for r in sheet.rows)
        scored = any(t.score for r in sheet.rows for t in r.samples)
        out.append(
            f'<p class="note">{len(sheet.rows)} source image(s) drawn with seed {seed}: each '
            f"original, then its {m} ED-SAM sample(s) labelled with the transport strength α"
            + (
                " and the objective's score."
                if scored
                else "; no sample records a score (the objective random measures none)."
            )
            + (
                ' The same sheet as a figure: <a href="contact.png">contact.png</a>.'
                if "contact.png" in figures
                else ""
            )
            + "</p>"
        )
        if sheet.note:
            out.append(f'<p class="note">{esc(sheet.note)}</p>')
        card = (1 + m) * (TILE + 6) + 24
        cards = "".join(_contact_card(r) for r in sheet.rows)
        out.append(f'<div class="sheet" style="--card: {card}px">{cards}</div>')
    out += [f'<p class="note">{esc(p)}</p>' for p in sheet.problems]
    return "".join(out) + "</section>"


def projection_section(p: Projection, figures: dict[str, bytes], seed: int) -> str:
    out = ['<section id="features"><h2>The feature space</h2>']
    if not p.coords:
        # The notes below say why when there are some (nothing asked for, unreadable files).
        out.append(
            empty(
                "nothing to project"
                if p.notes
                else "no feature is committed yet (the features and ldfs stages write them): "
                "nothing to project"
            )
        )
    else:
        counts = ", ".join(f"{ORIGIN_NAMES.get(o, o)} {n}" for o, n in p.counts().items())
        files = "; ".join(
            f"{read} of {total} {stage} file(s) read"
            for stage, (read, total) in p.files_read.items()
            if total
        )
        methods = " and ".join(p.coords)
        out.append(
            f'<p class="note">{p.n} points ({esc(counts)}), drawn with seed {seed}; {esc(files)}. '
            f"Projected with {esc(methods)} of the unit-normalized image embeddings."
            + (
                ""
                if "UMAP" in p.coords
                else " UMAP is drawn too when the umap-learn package is installed (from 20 points)."
            )
            + "</p>"
        )
        out.append(_figure(figures, "projection.png", "feature space projection"))
    out += [f'<p class="note">{esc(n)}</p>' for n in p.notes]
    return "".join(out) + "</section>"


def _num(v: float | None, digits: int = 3) -> str | None:
    return None if v is None or math.isnan(v) else f"{v:.{digits}f}"


def scores_part(r: Retention, figures: dict[str, bytes]) -> str:
    """Each ED-SAM sample's scores (the features files' caption_score and source_similarity
    columns) against alpha: a figure and the medians per alpha bin."""
    sc = r.scores
    if sc is None or not len(sc.caption_score):
        return ""
    out = [
        "<h3>Scores per sample, against alpha</h3>",
        '<p class="note">Every ED-SAM row of the features files carries <code>caption_score'
        "</code> (cos of the sample to its caption) and <code>source_similarity</code> (cos to "
        "its source image). <code>train.data.min_caption_score</code>, <code>"
        "max_source_similarity</code> and the manifest's <code>mix:</code> thresholds leave "
        "samples out of training and of the open_clip view by these columns; no sample is "
        "deleted.</p>",
    ]
    rows = [
        (
            f"{lo:+.2f} … {hi:+.2f}",
            str(n),
            _num(cap),
            _num(src),
        )
        for lo, hi, n, cap, src in sc.by_alpha()
    ]
    if rows:
        out.append(_figure(figures, "scores.png", "scores against alpha"))
        out.append(
            table(
                ["alpha bin", "samples", "median caption score", "median source similarity"], rows
            )
        )
    quart = [
        ("ED-SAM caption score", *_quartiles(sc.caption_score)),
        ("real caption score", *_quartiles(sc.real_caption_score)),
        ("ED-SAM source similarity", *_quartiles(sc.source_similarity)),
    ]
    out.append(table(["score", "25 %", "median", "75 %"], quart))
    return "".join(out)


def _quartiles(x) -> tuple[str | None, ...]:
    import numpy as np

    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if not len(x):
        return (None, None, None)
    return tuple(_num(float(v)) for v in np.percentile(x, [25, 50, 75]))


def retention_section(r: Retention, figures: dict[str, bytes]) -> str:
    out = ['<section id="retention"><h2>Do ED-SAM samples keep their class?</h2>']
    if r.real_accuracy is None:
        out.append(empty("no real image features with 2 or more classes yet: nothing to measure"))
    else:
        read, total = r.files_read
        out.append(
            f'<p class="note">A nearest-centroid classifier on the CLIP image embeddings: one '
            f"centroid per class from the {r.real} real images ({r.classes} classes, chance "
            f"{_num(r.chance)}), applied to the real images and to the {r.edsam} ED-SAM samples, "
            f"each labelled with its source's class. The cosines say how far the samples moved "
            f"(a copy has 1.0 to its source; two real images of one class have the last row) "
            f"and how well they still fit their caption. {read} of {total} features file(s) read."
            "</p>"
        )
        rows = [
            ("class accuracy, nearest centroid", _num(r.real_accuracy), _num(r.edsam_accuracy)),
            ("cos(image, its caption)", _num(r.real_to_caption), _num(r.edsam_to_caption)),
            ("cos(sample, its source image)", "1.000", _num(r.edsam_to_source)),
            ("cos(real, another real of its class)", _num(r.real_to_same_class), None),
        ]
        out.append(table(["measure", "real", "ED-SAM"], rows))
        out.append(scores_part(r, figures))
    out += [f'<p class="note">{esc(n)}</p>' for n in r.notes]
    return "".join(out) + "</section>"


def _state_line(view: RunView) -> str:
    st = view.status
    if not st.started:
        return "Not started: the output holds no plan yet."
    planned = sum(s.planned for s in st.stages.values())
    done = sum(s.done for s in st.stages.values())
    failed = sum(s.failed for s in st.stages.values())
    damaged = sum(len(s.damaged) for s in st.stages.values())
    if st.complete:
        return f"Complete: all {planned} planned shards are committed."
    text = f"Partial: {done} of {planned} planned shards committed"
    if failed:
        text += f", {failed} failed"
    if damaged:
        text += f", {damaged} damaged (missing or truncated since their commit)"
    return text + (" (run the same command again to redo them)." if failed or damaged else ".")


def run_section(view: RunView, figures: dict[str, bytes]) -> str:
    st = view.status
    out = ['<section id="run"><h2>The run</h2>']
    if not st.started:
        out.append(empty("the run has not started: there is no plan and no marker yet"))
        return "".join(out) + "</section>"
    rows = []
    for name, s in st.stages.items():
        timings = view.timings(name)
        busy = sum(t.duration_s for t in timings)
        span = (
            max(t.finished for t in timings) - min(t.started for t in timings) if timings else None
        )
        rows.append(
            [
                name,
                f"{s.output_dir}/",
                f"{s.done} / {s.planned}",
                s.failed,
                len(s.damaged),
                s.pending,
                s.samples,
                sum(s.failures.values()),
                f"{s.samples / busy:.1f}" if busy > 0 else None,
                _duration(span) if span is not None else None,
            ]
        )
    out.append(
        table(
            [
                "stage",
                "folder",
                "shards done",
                "failed",
                "damaged",
                "pending",
                "samples",
                "skipped samples",
                "samples/s per worker",
                "first start to last commit",
            ],
            rows,
            text_cols=2,
        )
    )
    stale = {n: s.stale for n, s in st.stages.items() if s.stale}
    if stale:
        out.append(
            '<p class="note">Committed with another config and not counted: '
            + esc(", ".join(f"{n} {k}" for n, k in stale.items()))
            + "</p>"
        )
    if st.lock:
        out.append(
            f'<p class="note">A run held this folder when the report was made (host '
            f"{esc(st.lock.get('host'))}, pid {esc(st.lock.get('pid'))}, started "
            f"{esc(st.lock.get('started_at'))}): the numbers are a snapshot.</p>"
        )
    out.append("<h3>Skipped samples by reason</h3>")
    reasons = [
        [name, reason, n]
        for name, s in st.stages.items()
        for reason, n in sorted(s.failures.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    out.append(
        table(["stage", "reason", "samples"], reasons, text_cols=2)
        if reasons
        else empty("no sample was skipped in the committed shards")
    )
    out.append("<h3>Failed shards</h3>")
    failed = [
        [name, f"{shard:05d}", rec.get("attempts"), rec.get("failed_at"), _first_line(rec)]
        for name, s in st.stages.items()
        for shard, rec in sorted(s.errors.items())
    ]
    # A damaged shard is lost work like a failed one: the same table, the same remedy.
    failed += [
        [name, f"{shard:05d}", None, None, f"damaged: {why}"]
        for name, s in st.stages.items()
        for shard, why in sorted(s.damaged.items())
    ]
    if failed:
        out.append(
            table(["stage", "shard", "attempts", "failed at", "error"], failed[:MAX_FAILED_ROWS])
        )
        if len(failed) > MAX_FAILED_ROWS:
            out.append(
                f'<p class="note">{len(failed) - MAX_FAILED_ROWS} more: `dgaug status` lists them.</p>'
            )
    else:
        out.append(empty("no shard failed"))
    out.append("<h3>Throughput</h3>")
    if "throughput.png" in figures:
        out.append(_figure(figures, "throughput.png", "samples committed over time"))
    else:
        out.append(empty("no shard is committed yet: no throughput to show"))
    return "".join(out) + "</section>"


def _first_line(rec: dict[str, Any]) -> str:
    text = str(rec.get("error") or rec.get("error_type") or "unknown error")
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _pct(v: Any) -> str | None:
    if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v):
        return None
    return f"{100 * v:.1f}"


def _metric_name(key: str) -> str:
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    for prefix, short in (("image_to_text@", "I→T R@"), ("text_to_image@", "T→I R@")):
        if key.startswith(prefix):
            return short + key.removeprefix(prefix)
    return key


def _metric_order(key: str) -> tuple[int, int, str]:
    kinds = ["zero_shot", "zero_shot_start", "probe", "image_to_text@", "text_to_image@"]
    for i, k in enumerate(kinds):
        if key == k or (k.endswith("@") and key.startswith(k)):
            tail = key.removeprefix(k)
            return i, int(tail) if tail.isdigit() else 0, key
    return len(kinds), 0, key


def eval_table(result: dict[str, Any]) -> str | None:
    domains = result.get("domains")
    if not isinstance(domains, dict) or not domains:
        return None
    entries = {str(d): v for d, v in domains.items() if isinstance(v, dict)}
    keys = sorted(
        {
            k
            for v in entries.values()
            for k, x in v.items()
            if isinstance(x, int | float) and not isinstance(x, bool) and k != "images"
        },
        key=_metric_order,
    )
    head = ["domain", "split", "images"] + [_metric_name(k) for k in keys]
    rows = []
    for d, v in entries.items():
        split = "held out" if v.get("held_out") else "train"
        rows.append([d, split, v.get("images")] + [_pct(v.get(k)) for k in keys])
    mean = result.get("held_out_mean")
    if isinstance(mean, dict):
        rows.append(
            ["held-out mean", "held out", mean.get("images")] + [_pct(mean.get(k)) for k in keys]
        )
    return table(head, rows, text_cols=2) if rows else None


def training_section(trainings: list[Training], figures: dict[str, bytes]) -> str:
    out = ['<section id="training"><h2>Training and evaluation</h2>']
    if not trainings:
        out.append(empty("no training has run on this output (`dgaug train MANIFEST` writes one)"))
    for t in trainings:
        out.append(f"<h3>dgaug train --mode {esc(t.mode)}</h3>")
        tr = t.train
        if tr:
            losses = [v for v in tr.get("losses") or [] if isinstance(v, int | float)]
            classes = tr.get("classes") or []
            shown = ", ".join(map(str, classes[:12])) + (" …" if len(classes) > 12 else "")
            row = [
                tr.get("mode", t.mode),
                tr.get("model"),
                tr.get("steps"),
                tr.get("resumed_from"),
                f"{losses[0]:.4g} → {losses[-1]:.4g}" if losses else None,
                f"{len(classes)}: {shown}" if classes else None,
            ]
            out.append(
                table(
                    ["mode", "model", "steps", "resumed from", "loss", "classes"],
                    [row],
                    text_cols=2,
                )
            )
            out.append(_figure(figures, f"loss-{t.mode}.png", f"{t.mode} training loss"))
        else:
            out.append(empty("no train.json: the training has not finished"))
        ev = eval_table(t.eval) if t.eval else None
        if ev:
            e = t.eval or {}
            domains = e.get("train_domains")
            out.append(
                '<p class="note">Accuracy and recall in % on the held-out evaluation images; '
                f"trained on {esc(', '.join(map(str, domains)) if domains else 'every domain')}; "
                f"linear probe {esc(e.get('probe', '–'))}.</p>"
            )
            out.append(ev)
        else:
            out.append(empty("no evaluation results (eval.json) for this training"))
        out += [f'<p class="note">{esc(p)}</p>' for p in t.problems]
    return "".join(out) + "</section>"


def render_page(
    *,
    title: str,
    output: str,
    generated: str,
    version: str,
    seed: int,
    view: RunView,
    sheet: ContactSheet,
    projection: Projection,
    retention: Retention,
    figures: dict[str, bytes],
) -> str:
    nav = "".join(
        f'<a href="#{a}">{esc(t)}</a>'
        for a, t in (
            ("augmentations", "Augmentations"),
            ("features", "Feature space"),
            ("retention", "Class kept?"),
            ("run", "The run"),
            ("training", "Training"),
        )
    )
    problems = ""
    if view.problems:
        items = "".join(f"<li>{esc(p)}</li>" for p in view.problems)
        problems = f'<section id="problems"><h2>Could not be read</h2><ul class="problems">{items}</ul></section>'
    body = (
        f"<header><h1>{esc(title)}</h1>"
        f'<p class="meta">output {esc(output)} · generated {esc(generated)} · dgaug {esc(version)}</p>'
        f'<p class="state">{esc(_state_line(view))}</p><nav>{nav}</nav></header>'
        + contact_section(sheet, figures, seed)
        + projection_section(projection, figures, seed)
        + retention_section(retention, figures)
        + run_section(view, figures)
        + training_section(view.trainings, figures)
        + problems
    )
    return page(title, body)
