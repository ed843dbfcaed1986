"""``attncc cache list|info|clear``: the kernel cache."""

from __future__ import annotations

import json

import click

@click.group()
def cache():
    """The kernel cache: generated Triton kernels and autotuning results (folder: ATTNCC_CACHE_DIR)."""


SUMMARY_FIRST = ("visit", "variant", "spec", "layout", "dtype", "d", "dv", "group", "causal")
"""Descriptor fields that say most about a kernel, shown first by ``attncc cache list``."""


def _entry_summary(descriptor: dict) -> str:
    """What an entry was generated for, compactly: the telling fields first, unset ones (None, False, empty)
    and bookkeeping (env, entry name, family, version) left out."""
    skip = {"entry", "env", "kernel", "configs", "family", "version"}
    names = [n for n in SUMMARY_FIRST if n in descriptor] + sorted(n for n in descriptor if n not in SUMMARY_FIRST)
    parts = []
    for name in names:
        value = descriptor[name]
        if name in skip or value in (None, False, "", "{}", {}, []):
            continue
        text = value if isinstance(value, str) and name in ("dtype", "variant", "spec", "visit", "layout") else (
            json.dumps(value, separators=(",", ":"), default=str))
        parts.append(f"{name}={text}")
    text = " ".join(parts)
    return text if len(text) <= 90 else text[:87] + "..."


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def cache_list(as_json):
    """List every cache entry: kind, key, kernel, what it was generated for, and whether it verifies."""
    from rich.console import Console
    from rich.table import Table

    from attncc.codegen.cache import default_cache

    store = default_cache()
    rows = []
    for path, entry in store.entries():
        if entry is None:
            rows.append({"kind": path.parent.name, "key": path.stem, "status": "damaged (will be rebuilt)",
                         "bytes": path.stat().st_size})
            continue
        descriptor = entry.descriptor
        kernel = descriptor.get("kernel", {}) if entry.kind == "tuning" else descriptor
        env = kernel.get("env", {})
        row = {"kind": entry.kind, "key": entry.key, "status": "ok", "bytes": path.stat().st_size,
               "entry": kernel.get("entry", ""), "arch": env.get("arch", ""), "what": _entry_summary(kernel)}
        if entry.kind == "tuning":
            row["what"] = f"bucket={descriptor.get('bucket')} best: {entry.payload.get('best', {}).get('params')}"
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"folder": str(store.root), "entries": rows}, indent=2))
        return
    console = Console(width=160)
    if not rows:
        console.print(f"no entries in {store.root}")
        return
    table = Table(title=f"{len(rows)} entries in {store.root}", title_justify="left")
    for column in ("kind", "key", "kernel", "arch", "what", "bytes", "status"):
        table.add_column(column, justify="right" if column == "bytes" else "left",
                         overflow="fold" if column == "what" else "ellipsis")
    for row in rows:
        table.add_row(row["kind"], row["key"][:12], row.get("entry", ""), row.get("arch", ""), row.get("what", ""),
                      str(row["bytes"]), row["status"])
    console.print(table)


@cache.command("info")
def cache_info():
    """Where the cache is, what it holds, and the switches in effect."""
    from attncc.codegen.cache import default_cache, disk_enabled, hits_required

    store = default_cache()
    entries = store.entries()
    counts = {kind: sum(1 for p, _ in entries if p.parent.name == kind) for kind in ("kernel", "tuning")}
    damaged = sum(1 for _, e in entries if e is None)
    size = sum(p.stat().st_size for p, _ in entries)
    triton_dir = store.root / "triton"
    triton_size = sum(p.stat().st_size for p in triton_dir.rglob("*") if p.is_file()) if triton_dir.is_dir() else 0
    lines = [
        f"folder:            {store.root}",
        f"kernels:           {counts['kernel']}",
        f"tuning results:    {counts['tuning']}",
        f"damaged entries:   {damaged}",
        f"entry bytes:       {size}",
        f"triton binaries:   {triton_size} bytes in {triton_dir}",
        f"disk cache:        {'on' if disk_enabled() else 'off (ATTNCC_DISABLE_CACHE)'}",
        f"assert cache hit:  {'on (ATTNCC_ASSERT_CACHE_HIT)' if hits_required() else 'off'}",
    ]
    click.echo("\n".join(lines))


@cache.command("clear")
def cache_clear():
    """Delete the entries and the Triton binaries attncc wrote under the cache folder (nothing else there)."""
    from attncc.codegen.cache import default_cache

    store = default_cache()
    removed = store.clear()
    click.echo(f"removed {removed} entries from {store.root}")
