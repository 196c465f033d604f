"""`neuroal report STORE --out DIR`: the paper's tables (Markdown + CSV) and plots (PNG) from the store.

Tables, one per model (and pattern):
- perplexity: rows method × top-up, columns sparsity × dataset; the best (lowest) per column in bold;
- zero-shot: rows method × top-up, columns sparsity × task plus the mean accuracy (`acc`, the papers'
  table) over the names asked for: a group with an aggregate of its own counts once, not again through
  its members' columns; best (highest) bold;
- other zero-shot metrics: every lm-eval metric of the tasks that report no `acc` (e.g. gsm8k's
  `exact_match,strict-match`), columns sparsity × task × metric, under lm-eval's own names;
- chosen λ: the block and row λ of every cell whose top-up searched one (NeuroAL).
Plots: perplexity vs sparsity per top-up, and accuracy per task.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from neuroal.errors import NeuroalError  # noqa: E402
from orchestrator.results.store import read_store  # noqa: E402

logger = logging.getLogger(__name__)

ACC_METRIC = "acc"
NOT_ZEROSHOT = ("perplexity", "perplexity_dense", "sparsity_actual", "error")  # the store's other metrics


def _md(df: pd.DataFrame, best: str | None, fmt: str) -> str:
    """Markdown table; the best value per column bolded ("min" or "max")."""
    cols = [" / ".join(str(x) for x in (c if isinstance(c, tuple) else (c,))) for c in df.columns]
    idx_names = list(df.index.names)
    lines = ["| " + " | ".join(idx_names + cols) + " |", "|" + "---|" * (len(idx_names) + len(cols))]
    marks = {}
    if best:
        for c in df.columns:
            col = df[c].dropna()
            if len(col):
                marks[c] = col.idxmin() if best == "min" else col.idxmax()
    for idx, row in df.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = []
        for c in df.columns:
            v = row[c]
            text = "" if pd.isna(v) else format(v, fmt)
            cells.append(f"**{text}**" if marks.get(c) == (idx if len(idx) > 1 else idx[0]) and text else text)
        lines.append("| " + " | ".join([str(i) for i in idx] + cells) + " |")
    return "\n".join(lines)


def _pivot(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return df.pivot_table(index=["method", "top_up"], columns=columns, values="value", aggfunc="mean").sort_index(axis=1)


def build_report(store: str | Path, out: str | Path) -> dict[str, list[Path]]:
    """Write tables and plots for everything in `store` into `out`; returns the files by kind."""
    store, out = Path(store), Path(out)
    rep = read_store(store)
    if not rep.table.num_rows and not rep.skipped:
        raise NeuroalError(f"store: {str(store)!r} holds no results (no *.parquet rows); give the folder that "
                           "`neuroal prune --store` or `neuroal grid --store` wrote")
    out.mkdir(parents=True, exist_ok=True)
    df = rep.table.to_pandas()
    files: dict[str, list[Path]] = {"tables": [], "plots": []}
    sections = [f"# Results from `{store}`", ""]
    if rep.skipped:
        sections += ["Unreadable store files (skipped):", *[f"- `{p}`: {why}" for p, why in rep.skipped], ""]
    failed = df[df["metric"] == "error"]
    # a failure a rerun made good (the cell's prune or evaluation row exists now) is history, not news
    done = set(zip(df["cell_key"], df["task"]))
    redone = [(k, t.split(":")[2] or "prune") in done for k, t in zip(failed["cell_key"], failed["task"])]
    failed = failed[[not r for r in redone]]
    if len(failed):
        sections += ["Failed cells:", *[f"- {r.model} {r.method} {r.top_up} {r.sparsity:g}: {r.note}" for r in failed.itertuples()], ""]
    df = df[df["metric"] != "error"]
    df = df.assign(member=_members_of_aggregates(df))
    if "protocol" in df:  # a result is labelled by how it was made: two protocols are two columns, never a mean
        labelled = df["protocol"].notna() & (df["protocol"] != "")
        df.loc[labelled, "task"] = df.loc[labelled, "task"] + " (" + df.loc[labelled, "protocol"] + ")"
    for (model, pattern), part in df.groupby(["model", "pattern"], sort=True):
        slug = f"{model.split('/')[-1]}-{pattern.replace(':', 'of')}"
        sections += [f"## {model} ({pattern})", ""]
        ppl = part[part["metric"] == "perplexity"]
        if len(ppl):
            table = _pivot(ppl, ["sparsity", "task"])
            files["tables"] += _write(table, out / f"perplexity-{slug}", best="min", fmt=".2f")
            sections += ["Perplexity (lower is better)", "", _md(table, "min", ".2f"), ""]
            files["plots"].append(_plot_ppl(ppl, out / f"perplexity-{slug}.png", model))
            sections += [f"![perplexity vs sparsity]({files['plots'][-1].name})", ""]
        acc = part[part["metric"] == ACC_METRIC]
        if len(acc):
            table = _pivot(acc, ["sparsity", "task"])
            members = set(acc.loc[acc["member"], "task"])
            for s in sorted(acc["sparsity"].unique()):
                cols = [c for c in table.columns if c[0] == s and c[1] not in members]
                table[(s, "mean")] = table[cols].mean(axis=1)
            table = table.sort_index(axis=1)
            files["tables"] += _write(table, out / f"zeroshot-{slug}", best="max", fmt=".4f")
            sections += [f"Zero-shot accuracy ({ACC_METRIC}, higher is better)", "", _md(table, "max", ".4f"), ""]
            files["plots"].append(_plot_acc(acc, out / f"zeroshot-{slug}.png", model))
            sections += [f"![zero-shot accuracy per task]({files['plots'][-1].name})", ""]
        zs = part[(part["task"] != "prune") & ~part["metric"].isin(NOT_ZEROSHOT)]
        other = zs[~zs["task"].isin(set(acc["task"]))]  # tasks with no `acc`: generation, perplexity-like, ...
        if len(other):
            table = _pivot(other, ["sparsity", "task", "metric"])
            files["tables"] += _write(table, out / f"zeroshot-other-{slug}", best=None, fmt=".4f")
            sections += ["Other zero-shot metrics (lm-eval's names)", "", _md(table, None, ".4f"), ""]
        lam = part[part["lambda_block"].notna() & (part["task"] == "prune")]  # cells whose top-up chose a λ
        if len(lam):
            t = lam[["method", "top_up", "sparsity", "lambda_block", "lambda_row", "value"]].rename(
                columns={"value": "sparsity_actual"}).drop_duplicates().sort_values(["method", "top_up", "sparsity"])
            t.to_csv(out / f"lambdas-{slug}.csv", index=False)
            files["tables"].append(out / f"lambdas-{slug}.csv")
            sections += ["Chosen λ", "", _md(t.set_index(["method", "top_up", "sparsity"]), None, ".4g"), ""]
    md = out / "report.md"
    md.write_text("\n".join(sections))
    files["tables"].insert(0, md)
    return files


def _members_of_aggregates(df: pd.DataFrame) -> pd.Series:
    """True on the rows of a group's members whose group has a row of its own (lm-eval's aggregate):
    averaged beside it they would count twice. Rows stored before `request` was kept are False."""
    if "request" not in df:
        return pd.Series(False, index=df.index)
    under = df["request"].notna() & (df["request"] != df["task"])
    aggregated = set(df.loc[under, "request"]) & set(df.loc[df["request"] == df["task"], "task"])
    return under & df["request"].isin(aggregated)


def _write(table: pd.DataFrame, stem: Path, best: str | None, fmt: str) -> list[Path]:
    csv = stem.with_suffix(".csv")
    table.to_csv(csv)
    md = stem.with_suffix(".md")
    md.write_text(_md(table, best, fmt) + "\n")
    return [md, csv]


def _plot_ppl(ppl: pd.DataFrame, path: Path, model: str) -> Path:
    tasks = sorted(ppl["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = ppl[ppl["task"] == task]
        for (method, top_up), g in sub.groupby(["method", "top_up"]):
            g = g.groupby("sparsity")["value"].mean()
            ax.plot(g.index, g.values, "o-", label=f"{method} + {top_up}")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{task} perplexity")
        ax.set_title(model.split("/")[-1])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_acc(acc: pd.DataFrame, path: Path, model: str) -> Path:
    sparsities = sorted(acc["sparsity"].unique())
    fig, axes = plt.subplots(1, len(sparsities), figsize=(6 * len(sparsities), 3.8), squeeze=False)
    for ax, s in zip(axes[0], sparsities):
        sub = acc[acc["sparsity"] == s].pivot_table(index="task", columns=["method", "top_up"], values="value")
        sub.plot.bar(ax=ax, rot=0)
        ax.set_ylim(0, 1)
        ax.set_ylabel(ACC_METRIC)
        ax.set_title(f"{model.split('/')[-1]} at {s:g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
