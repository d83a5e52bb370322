"""The dashboard's HTML: plain functions from prepared rows to page text.

Every value that came from the catalog passes through `esc`: subject names come from
users' folder names and captions from prompts, so none of it is trusted as markup.
Links are relative (`root` is "" for top-level pages, "../" below), so the site works
from file:// and keeps working when the folder is moved or zipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any, Iterable, Mapping, Sequence

from ..catalog import CatalogVersion
from ..training.subjects import IN_CATALOG
from .plots import fmt, line_plot

STYLESHEET = "style.css"
CONCEPTS_PAGE = "concepts.html"
HEADLINE_METRICS = ("dino", "clip_i", "clip_t")
SCORER_FLAGS = {"random-test": "random-test scorer: not a real score", "proxy": "proxy scorer: approximate"}

CSS = """\
body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1200px;margin:0 auto;padding:16px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse}td,th{border-bottom:1px solid #e4e4e4;padding:4px 8px;text-align:left;vertical-align:top}
.muted{color:#666;font-size:12px}
.thumb{width:128px;height:128px;object-fit:contain;background:#f3f3f3;border:1px solid #ddd}
.cover .thumb,.cover .missing{width:64px;height:64px}
.missing{display:inline-flex;align-items:center;justify-content:center;box-sizing:border-box;width:128px;height:128px;
padding:4px;border:1px dashed #b00;background:#fbeaea;color:#800;font-size:11px;text-align:center;overflow-wrap:anywhere}
figure{display:inline-block;margin:4px;vertical-align:top}figcaption{font-size:12px;color:#555;max-width:262px;overflow-wrap:anywhere}
.pair{display:flex;gap:4px}
.badge{display:inline-block;margin:0 2px;padding:0 6px;border-radius:8px;font-size:12px;font-weight:600}
.flag{background:#fff3cd;color:#6b4100;border:1px solid #d39e00}
.status-completed{background:#d4edda;color:#155724}.status-partial{background:#fff3cd;color:#6b4100}
.status-failed{background:#f8d7da;color:#721c24}
.failures{margin:4px 0;padding:4px 8px;list-style:none;background:#f8d7da;border-left:4px solid #c00}
.failures code{white-space:pre-wrap;color:#721c24}
.flagged{background:#fff8e1}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots figure{border:1px solid #eee;padding:4px}.plots figcaption{max-width:none}
.plot .axis{stroke:#888}.plot .series{fill:none;stroke-width:2}.plot text{font-size:11px;fill:#444}
.pager{margin:10px 0}.pager a,.pager span{margin-right:12px}
.strip td{padding:2px}.strip figure{margin:0}
"""


@dataclass(frozen=True)
class Thumb:
    src: str | None  # relative to the site root; None when the image could not be shown
    note: str = ""  # why there is no image


@dataclass(frozen=True)
class Entry:
    """One subject as the paged list shows it."""

    subject: dict
    href: str  # its page, relative to the site root
    cover: Thumb
    scores: Mapping[str, Mapping[str, dict]]  # method -> metric -> metrics row


@dataclass(frozen=True)
class Trend:
    metric: str
    series: Mapping[str, Sequence[tuple[float, float]]]  # method -> (catalog_version, mean value)
    flags: Mapping[str, Sequence[str]]  # method -> the non-pretrained scorer kinds behind its points


@dataclass(frozen=True)
class ConceptSet:
    """One learned concept set with its EM masks, as the concepts page shows it."""

    model: dict  # its models row
    params: dict  # the row's params, parsed
    masks: Mapping[str, Sequence[tuple[dict, Thumb]]]  # token -> (concept_masks row, its thumbnail)
    photos: Mapping[str, Thumb]  # image_id -> the photo's thumbnail


def esc(value: Any) -> str:
    return "" if value is None else escape(str(value))


def when(value: datetime | str | None) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")
    return esc(value)


def page(title: str, body: str, root: str = "") -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{esc(title)}</title><link rel="stylesheet" href="{root}{STYLESHEET}"></head>\n'
            f"<body>\n{body}\n</body></html>\n")


def thumb(image: Thumb, alt: str, root: str) -> str:
    if image.src:
        return f'<img class="thumb" src="{root}{esc(image.src)}" alt="{esc(alt)}">'
    return f'<span class="missing" title="{esc(alt)}">image unavailable: {esc(image.note)}</span>'


def figure(image: Thumb, alt: str, caption: str, root: str) -> str:
    return f"<figure>{thumb(image, alt, root)}<figcaption>{caption}</figcaption></figure>"


def scorer_flag(kind: str) -> str:
    """A visible badge for any score not made by a real pretrained scorer."""
    if kind == "pretrained":
        return ""
    return f'<span class="badge flag">{esc(SCORER_FLAGS.get(kind, f"{kind} scorer"))}</span>'


def _flags(rows: Iterable[dict]) -> str:
    return "".join(scorer_flag(kind) for kind in sorted({r["scorer_kind"] for r in rows}))


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def or_none(html: str, what: str) -> str:
    return html or f'<p class="muted">No {what} yet.</p>'


def section(anchor: str, title: str, body: str, what: str) -> str:
    return f'<section id="{anchor}"><h2>{title}</h2>{or_none(body, what)}</section>'


# -- the paged subject list --------------------------------------------------------


def pager(number: int, hrefs: Sequence[str]) -> str:
    prev = f'<a rel="prev" href="{hrefs[number - 2]}">&larr; previous</a>' if number > 1 else ""
    nxt = f'<a rel="next" href="{hrefs[number]}">next &rarr;</a>' if number < len(hrefs) else ""
    return f'<nav class="pager">{prev}<span>page {number} of {len(hrefs)}</span>{nxt}</nav>'


def headline(scores: Mapping[str, Mapping[str, dict]]) -> str:
    lines = []
    for method, by_metric in sorted(scores.items()):
        shown = [m for m in HEADLINE_METRICS if m in by_metric] or sorted(by_metric)
        values = " &middot; ".join(f"{esc(m)} {fmt(by_metric[m]['value'])}" for m in shown)
        lines.append(f"<div><b>{esc(method)}</b> {values} {_flags(by_metric[m] for m in shown)}</div>")
    return "".join(lines) or '<span class="muted">not evaluated</span>'


def subject_list(entries: Sequence[Entry], total: int, number: int, hrefs: Sequence[str]) -> str:
    rows = [(f'<a class="cover" href="{e.href}">{thumb(e.cover, e.subject["name"], "")}</a>',
             f'<a class="subject-link" href="{e.href}">{esc(e.subject["name"])}</a>'
             f'<div class="muted">{esc(e.subject["class_name"])} &middot; {esc(e.subject["n_images"])} photos</div>',
             headline(e.scores)) for e in entries]
    listing = table(("", "subject", "headline scores (latest version)"), rows, "subjects") if rows else ""
    nav = pager(number, hrefs)
    return f'<section id="subjects"><h2>Subjects ({total})</h2>{nav}{or_none(listing, "subjects")}{nav}</section>'


def list_page(entries: Sequence[Entry], total: int, number: int, hrefs: Sequence[str]) -> str:
    body = ('<h1>subjectflow dashboard</h1><p><a href="index.html">catalog summary</a></p>'
            + subject_list(entries, total, number, hrefs))
    return page(f"subjects, page {number}", body)


# -- the index's own sections --------------------------------------------------------


def summary(catalog_root: str, version: CatalogVersion | None, counts: Mapping[str, int],
            missing: Sequence[str]) -> str:
    if version is None:
        latest = "not versioned yet"
    else:
        latest = f"<b>v{version.number}</b> ({esc(version.date)}): {esc(version.summary)}"
    counts_table = table(tuple(map(esc, counts)), [tuple(str(n) for n in counts.values())], "counts")
    problems = ""
    if missing:
        items = "".join(f"<li>{esc(m)}</li>" for m in missing)
        problems = (f'<details class="problems"><summary>{len(missing)} image(s) missing or unreadable '
                    f"(shown as placeholders)</summary><ul>{items}</ul></details>")
    return (f'<section id="summary"><h2>Catalog</h2><p class="muted">{esc(catalog_root)}</p>'
            f'<p>Latest version: <span id="latest-version">{latest}</span></p>{counts_table}{problems}</section>')


def trends_section(trends: Sequence[Trend]) -> str:
    plots = []
    for trend in trends:
        flags = "".join(f"<div>{esc(method)}: {''.join(scorer_flag(k) for k in kinds)}</div>"
                        for method, kinds in sorted(trend.flags.items()) if kinds)
        svg = line_plot(f"{trend.metric} by catalog version", trend.series)
        plots.append(f'<figure class="trend" data-metric="{esc(trend.metric)}">'
                     f"<figcaption><b>{esc(trend.metric)}</b> (mean per method and version){flags}</figcaption>"
                     f"{svg}</figure>")
    body = f'<div class="plots">{"".join(plots)}</div>' if plots else ""
    return section("trends", "Metric trends", body, "versioned metrics")


def failures(text: str) -> list[tuple[str, str]]:
    """(item, error) pairs from a run's JSON failure list; text that is not one is shown whole."""
    try:
        parsed = json.loads(text or "[]")
    except ValueError:
        return [("", text)]
    if not isinstance(parsed, list):
        return [("", text)]
    return [(str(f.get("item", "")), str(f.get("error", ""))) if isinstance(f, dict) else ("", str(f)) for f in parsed]


def _names(values: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(esc(v) for v in values[:limit])
    more = f" &hellip; (+{len(values) - limit})" if len(values) > limit else ""
    return f"{len(values)}<div class='muted'>{shown}{more}</div>" if values else "0"


def runs_section(runs: Sequence[dict]) -> str:
    rows = []
    for run in runs:
        failed = failures(run["failures"])
        failure_list = "".join(f"<li><b>{esc(item)}</b> <code>{esc(error)}</code></li>" for item, error in failed)
        rows.append((
            when(run["started_at"]),
            esc(run["flow"]),
            f'<span class="badge status-{esc(run["status"])}">{esc(run["status"])}</span>',
            esc("" if run["catalog_version"] is None else f"v{run['catalog_version']}"),
            _names(run["ran"]),
            _names(run["reused"]),
            esc(run["summary"]) + (f'<ul class="failures">{failure_list}</ul>' if failed else ""),
        ))
    history = table(("started", "flow", "status", "version", "ran", "reused", "summary / failures"), rows, "runs")
    return section("runs", "Run history", history if rows else "", "runs")


def concept_sets_section(sets: Sequence[ConceptSet]) -> str:
    """Absent, not empty, without concept sets: most catalogs never learn one."""
    rows = [(f'<a href="{CONCEPTS_PAGE}#{concept_anchor(s.model)}">{esc(s.params["set"])}</a>',
             " ".join(map(esc, s.params["tokens"])), esc(s.params["refine"]), when(s.model["created_at"]))
            for s in sets]
    listing = table(("set", "tokens", "refined by", "created"), rows, "concept-sets")
    return section("concept-sets", f"Concept sets ({len(sets)})", listing, "concept sets") if rows else ""


def index_page(summary_html: str, subjects_html: str, trends: Sequence[Trend], runs: Sequence[dict],
               concept_sets: Sequence[ConceptSet] = ()) -> str:
    body = ("<h1>subjectflow dashboard</h1>" + summary_html + subjects_html + concept_sets_section(concept_sets)
            + trends_section(trends) + runs_section(runs))
    return page("subjectflow dashboard", body)


# -- concept sets -------------------------------------------------------------------


def concept_anchor(model: dict) -> str:
    return f"set-{esc(model['model_id'][:12])}"  # a set's name may be learned again, as a new model


def concept_strip(token: str, source: str, masks: Sequence[tuple[dict, Thumb]], photos: Mapping[str, Thumb]) -> str:
    """A row per photo, a column per E-step, so a mask's drift reads left to right."""
    steps = sorted({(r["iteration"], r["step"]) for r, _ in masks})
    cells: dict[str, dict[int, str]] = {}
    for row, image in masks:
        exact = "" if row["iou_exact"] is None else f" &middot; exact {fmt(row['iou_exact'])}"
        cells.setdefault(row["image_id"], {})[row["iteration"]] = figure(
            image, f"{token} mask, iteration {row['iteration']}",
            f"it {row['iteration']} &middot; step {row['step']}<br>IoU {fmt(row['iou_ingest'])}{exact}", "")
    regions = {r["image_id"]: r["region"] for r, _ in masks}
    rows = ((figure(photos[i], "photo", f"{esc(i[:12])} &middot; {esc(regions[i])}", ""),
             *(by_iteration.get(it, "") for it, _ in steps)) for i, by_iteration in cells.items())
    grid = table(("photo", *(f"iteration {it} (step {step})" for it, step in steps)), rows, "strip")
    return (f'<div class="concept" data-concept="{esc(token)}"><h3>{esc(token)} '
            f'<span class="muted">from {esc(source)}</span></h3>{or_none(grid if masks else "", "masks")}</div>')


def concepts_page(sets: Sequence[ConceptSet]) -> str:
    body = '<nav><a href="index.html">&larr; catalog summary</a></nav><h1>Concept sets</h1>'
    for s in sets:
        strips = "".join(concept_strip(token, source, s.masks.get(token, ()), s.photos)
                         for token, source in zip(s.params["tokens"], s.params["sources"]))
        body += (f'<section id="{concept_anchor(s.model)}"><h2>{esc(s.params["set"])}</h2>'
                 f'<p class="muted">model {esc(s.model["model_id"][:12])} '
                 f'&middot; refined by {esc(s.params["refine"])} '
                 f'&middot; IoU against the ingest mask; exact against a drawn demo photo&#x27;s true mask '
                 f'&middot; created {when(s.model["created_at"])}</p>{strips}</section>')
    return page("concept sets", body)


# -- one subject --------------------------------------------------------------------


def subject_page(subject: dict, list_href: str, photos: Sequence[tuple[dict, Thumb, Thumb]],
                 negatives: Sequence[tuple[dict, Thumb]], jointsets: Mapping[str, Sequence[tuple[dict, Thumb]]],
                 samples: Sequence[tuple[dict, Thumb]], adapters: Sequence[dict], models: Sequence[dict],
                 scores: Mapping[str, Mapping[str, dict]], prompt_rows: Sequence[dict] = ()) -> str:
    root, name = "../", subject["name"]
    header = (f'<nav><a href="{root}{list_href}">&larr; all subjects</a></nav><h1>{esc(name)}</h1>'
              f'<p class="muted">id {esc(subject["subject_id"])} &middot; class {esc(subject["class_name"])} '
              f'&middot; {esc(subject["n_images"])} photos &middot; from {esc(subject["source"])} '
              f'&middot; updated {when(subject["updated_at"])}</p>')
    pairs = "".join(
        f'<figure class="photo"><div class="pair">{thumb(photo, f"photo of {name}", root)}'
        f'{thumb(mask, f"mask of {name}", root)}</div><figcaption>{esc(row["image_id"][:12])} &middot; '
        f'{row["width"]}&times;{row["height"]} &middot; mask {esc(row["mask_method"])} '
        f'{row["mask_coverage"]:.0%}</figcaption></figure>' for row, photo, mask in photos)
    negs = "".join(figure(t, f"negative of {name}", f"{esc(r['generator'])}: {esc(r['prompt'])}", root)
                   for r, t in negatives)
    sets = "".join(
        f'<div class="jointset"><h3>set {esc(set_id[:12])} ({len(members)} members)</h3>'
        + "".join(figure(t, f"joint set member {r['member']}",
                         f"#{r['member']} {esc(r['origin'])}: {esc(r['caption'])}", root) for r, t in members)
        + "</div>" for set_id, members in jointsets.items())
    return page(name, header + scores_section(scores) + weakest_prompts_section(prompt_rows)
                + section("photos", f"Photos and masks ({len(photos)})", pairs, "photos")
                + section("negatives", f"CDNS negatives ({len(negatives)})", negs, "negatives")
                + section("jointsets", f"Joint sets ({len(jointsets)})", sets, "joint sets")
                + samples_section(samples, name, root)
                + artefacts_section(adapters, models), root)


def scores_section(scores: Mapping[str, Mapping[str, dict]]) -> str:
    metrics = sorted({m for by_metric in scores.values() for m in by_metric})
    rows = []
    for method, by_metric in sorted(scores.items()):
        version = next(iter(by_metric.values()))["catalog_version"]  # one version per method
        cells = []
        for metric in metrics:
            row = by_metric.get(metric)
            flag = scorer_flag(row["scorer_kind"]) if row else ""
            cells.append("" if row is None else f'<span class="{"flagged" if flag else ""}" '
                         f'title="{esc(row["scorer"])}">{fmt(row["value"])}</span>{flag}')
        seen = any(r.get("split") == IN_CATALOG for r in by_metric.values())
        badge = ' <span class="flagged" title="the shared model trained on this subject: not zero-shot">in-catalog</span>'
        rows.append((f"<b>{esc(method)}</b>{badge if seen else ''}", "unversioned" if version is None else f"v{version}",
                     *cells))
    scored = table(("method", "version", *map(esc, metrics)), rows, "scores") if rows else ""
    return section("scores", "Scores (latest version per method)", scored, "scores")


WEAKEST = 3  # prompts shown per method and metric


def weakest_prompts_section(prompt_rows: Sequence[dict]) -> str:
    """Per method, the prompts its latest evaluation scored lowest on subject fidelity
    (DINO) and prompt fidelity (CLIP-T): where to look first."""
    rows = []
    for method in sorted({r["method"] for r in prompt_rows}):
        for metric in ("dino", "clip_t"):
            scored = sorted((r for r in prompt_rows if r["method"] == method and r["metric"] == metric),
                            key=lambda r: r["value"])
            rows += [(f"<b>{esc(method)}</b>", esc(metric), esc(r["prompt"]), fmt(r["value"]), esc(r["n_images"]))
                     for r in scored[:WEAKEST]]
    body = table(("method", "metric", "prompt", "value", "images"), rows, "prompts") if rows else ""
    return section("prompts", "Weakest prompts (latest evaluation)", body, "per-prompt scores")


def samples_section(samples: Sequence[tuple[dict, Thumb]], name: str, root: str) -> str:
    """One row per prompt, one column per method, so methods compare side by side."""
    methods = sorted({r["method"] for r, _ in samples})
    cells: dict[str, dict[str, list[str]]] = {}
    for row, image in sorted(samples, key=lambda s: (s[0]["prompt"], s[0]["seed"])):
        cells.setdefault(row["prompt"], {}).setdefault(row["method"], []).append(
            figure(image, f"{row['method']} sample of {name}", f"seed {row['seed']}", root))
    rows = ((esc(prompt), *("".join(by_method.get(m, [])) for m in methods)) for prompt, by_method in cells.items())
    grid = table(("prompt", *map(esc, methods)), rows, "samples") if samples else ""
    return section("samples", f"Samples ({len(samples)})", grid, "samples")


def artefacts_section(adapters: Sequence[dict], models: Sequence[dict]) -> str:
    rows = [(esc(kind), esc(r["method"]), f"<code>{esc(r[key][:12])}</code>", esc(r["steps"]), fmt(r["final_loss"]),
             esc("" if r["trained_on_version"] is None else f"v{r['trained_on_version']}"), when(r["created_at"]))
            for kind, key, group in (("adapter", "adapter_id", adapters), ("shared model", "model_id", models))
            for r in group]
    header = ("kind", "method", "id", "steps", "final loss", "trained on", "created")
    return section("models", "Adapters and models", table(header, rows, "artefacts") if rows else "",
                   "adapters or models")
