"""`mix/`: links to every committed tar shard of every stage, with one sizes.json for all of them."""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Protocol

from dgaug.core.atomic import temporary_name
from dgaug.core.hashing import record_hash
from dgaug.core.storage import Storage

log = logging.getLogger(__name__)

# open_clip reads sizes.json only beside the FIRST shard of `--train-data` and looks every shard
# up by its base name, so shards of several folders joined with `::` need one folder of unique
# names: real/00000.tar is mix/real-00000.tar, edsam/00000.tar is mix/edsam-00000.tar.
MIX_DIR = "mix"
SIZES = "sizes.json"
FILTERED = "filtered.json"  # what each filtered copy in mix/ was made from, and with which rule


class ViewFilter(Protocol):
    """Leaves samples of some stage folders out of the view (the shards keep them)."""

    stage_dirs: frozenset[str]  # the folders it judges; others are linked whole
    rule: str  # what it keeps, as a line for logs and filtered.json

    def left_out(self, stage_dir: str, shard: str) -> set[str] | None:
        """Keys of `stage_dir/shard` to leave out; None: the shard cannot be judged yet (its
        scores are not committed), so the view leaves the whole shard out."""


def mix_entries(tar_sizes: dict[str, dict[str, int]]) -> dict[str, tuple[str, int]]:
    """Link name -> (relative target, samples) for `tar_sizes`: stage folder -> its sizes.json."""
    entries: dict[str, tuple[str, int]] = {}
    for stage_dir, sizes in tar_sizes.items():
        prefix = posixpath.basename(stage_dir.rstrip("/"))
        for shard, n in sizes.items():
            # Relative, so the output folder can be moved or mounted elsewhere as a whole.
            target = posixpath.relpath(f"{stage_dir}/{shard}", MIX_DIR)
            entries[f"{prefix}-{shard}"] = (target, int(n))
    return entries


def _link(folder: str, name: str, target: str) -> None:
    """Make `folder/name` a symlink to `target`; a reader sees the old entry or the new one."""
    path = os.path.join(folder, name)
    if os.path.islink(path) and os.readlink(path) == target:
        return
    tmp = temporary_name(path)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _remove_stale(folder: str, keep: set[str]) -> int:
    """Remove links and filtered copies that name no shard of the view (and half-made
    temporaries); returns how many."""
    removed = 0
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        stale = (os.path.islink(path) or name.endswith(".tar")) and name not in keep
        if stale or name.endswith(".tmp"):
            os.unlink(path)
            removed += 1
    return removed


def _filtered_copy(folder: str, name: str, target: str, drop: set[str], record: dict) -> int:
    """Make `folder/name` a copy of `target` without the `drop` keys; returns its samples.

    Copies, because open_clip cannot skip samples inside a tar; made once per source shard and
    set of left-out keys (`record` says what an existing copy was made from: a remade shard or
    changed scores remake it) and replaced atomically.
    """
    from dgaug.core.tars import read_tar_samples, write_deterministic_tar

    path = os.path.join(folder, name)
    source = os.path.normpath(os.path.join(folder, target))
    st = os.stat(source)
    made_from = {
        "source": target,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "left_out_keys": record_hash(sorted(drop)),
    }
    old = record.get(name)
    current = old and {k: old.get(k) for k in made_from} == made_from
    if current and os.path.isfile(path) and not os.path.islink(path):
        return int(old["samples"])
    kept = [(k, m) for k, m in read_tar_samples(source) if k not in drop]
    tmp = temporary_name(path)
    try:
        write_deterministic_tar(tmp, kept)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    record[name] = {**made_from, "samples": len(kept), "left_out": len(drop)}
    return len(kept)


def write_mix(
    storage: Storage,
    tar_sizes: dict[str, dict[str, int]],
    view_filter: ViewFilter | None = None,
) -> dict[str, int] | None:
    """Sync `mix/` with the committed shards in `tar_sizes`; returns mix/sizes.json's content.

    Idempotent: links already right are left alone, wrong ones replaced, stale ones removed.
    With `view_filter`, shards of the folders it judges become filtered copies (samples it
    leaves out are not in them; the shards themselves are untouched). None when there is
    nothing to link or the output is not a local folder.
    """
    if not storage.is_local:
        # Object stores have no symlinks and copying the tars would double the data.
        log.info("output %s is not a local folder: no %s/ view", storage.root, MIX_DIR)
        return None
    entries = mix_entries(tar_sizes)
    folder = storage.path(MIX_DIR)
    if not entries:
        if os.path.isdir(folder):
            # No committed shard left (e.g. --force removed them): an old view would mislead.
            _remove_stale(folder, set())
            storage.remove(f"{MIX_DIR}/{SIZES}")
        return None
    os.makedirs(folder, exist_ok=True)
    record = _read_record(storage, view_filter)
    sizes: dict[str, int] = {}
    filtered: dict[str, dict] = {}
    for name, (target, n) in sorted(entries.items()):
        stage_dir = _stage_dir_of(tar_sizes, name)
        if view_filter is None or stage_dir not in view_filter.stage_dirs:
            _link(folder, name, target)
            sizes[name] = n
            continue
        drop = view_filter.left_out(stage_dir, name.rpartition("-")[2])
        if drop is None:
            continue  # not judged yet: left out whole, a later run adds it
        sizes[name] = _filtered_copy(folder, name, target, drop, record)
        filtered[name] = record[name]
    # Files first, then sizes: every shard a reader can name in sizes.json is already there.
    storage.write_json(f"{MIX_DIR}/{SIZES}", sizes)
    if view_filter is not None:
        storage.write_json(f"{MIX_DIR}/{FILTERED}", {"rule": view_filter.rule, "shards": filtered})
    elif storage.exists(f"{MIX_DIR}/{FILTERED}"):
        storage.remove(f"{MIX_DIR}/{FILTERED}")
    removed = _remove_stale(folder, set(sizes) | {SIZES, FILTERED})
    log.info(
        "%s/: %d shard(s), %d filtered copies, %d stale removed",
        MIX_DIR,
        len(sizes),
        len(filtered),
        removed,
    )
    return sizes


def _stage_dir_of(tar_sizes: dict[str, dict[str, int]], name: str) -> str:
    prefix = name.rpartition("-")[0]
    return next(d for d in tar_sizes if posixpath.basename(d.rstrip("/")) == prefix)


def _read_record(storage: Storage, view_filter: ViewFilter | None) -> dict:
    """The filtered copies' record, if made by the same rule (another rule remakes them all)."""
    if view_filter is None or not storage.exists(f"{MIX_DIR}/{FILTERED}"):
        return {}
    try:
        old = json.loads(storage.read_text(f"{MIX_DIR}/{FILTERED}"))
    except ValueError:
        return {}
    return dict(old.get("shards", {})) if old.get("rule") == view_filter.rule else {}


def train_data_pattern(root: str, names: list[str], order: list[str]) -> str:
    """open_clip's --train-data for the mix: one brace range per stage folder (in `order`, the
    folders' names), joined with `::`. A folder whose shard numbers are not contiguous (some
    failed) has each shard listed on its own.
    """
    groups: dict[str, list[str]] = {p: [] for p in order}
    for name in sorted(names):
        prefix, _, rest = name.rpartition("-")
        groups.setdefault(prefix, []).append(rest.removesuffix(".tar"))
    parts = []
    for prefix, ids in groups.items():
        if not ids:
            continue
        nums = [int(i) for i in ids]
        width = len(ids[0])
        contiguous = nums == list(range(nums[0], nums[0] + len(nums)))
        if len(ids) == 1:
            parts.append(f"{root}/{MIX_DIR}/{prefix}-{ids[0]}.tar")
        elif contiguous and all(len(i) == width for i in ids):
            parts.append(f"{root}/{MIX_DIR}/{prefix}-{{{ids[0]}..{ids[-1]}}}.tar")
        else:
            parts += [f"{root}/{MIX_DIR}/{prefix}-{i}.tar" for i in ids]
    return "::".join(parts)


def balanced_mix_args(root: str, sizes: dict[str, int], base: str, extra: str) -> str | None:
    """open_clip arguments that draw one `extra` sample per `base` sample in expectation (the
    paper's L(x_s, p_s) + L(x*, p_s) for base real/ and extra edsam/), over the mix/ view.

    With --dataset-resampled open_clip picks each shard with probability proportional to its
    group's factor; an edsam shard holds M times the samples of a real one, so the factor
    base_samples / extra_samples makes the two equal in expectation. An epoch is then
    2 x base_samples. None when either folder has no committed shard.
    """
    counts = {p: 0 for p in (base, extra)}
    names: list[str] = []
    for name, n in sizes.items():
        prefix = name.rpartition("-")[0]
        if prefix in counts:
            counts[prefix] += int(n)
            names.append(name)
    if not counts[base] or not counts[extra]:
        return None
    pattern = train_data_pattern(root, names, [base, extra])
    factor = f"{counts[base] / counts[extra]:.6g}"
    return (
        f"--train-data '{pattern}' --dataset-resampled "
        f"--train-data-upsampling-factors '1::{factor}' --train-num-samples {2 * counts[base]}"
    )
