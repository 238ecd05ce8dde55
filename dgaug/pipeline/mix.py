"""`mix/`: links to every committed tar shard of every stage, with one sizes.json for all of them."""

from __future__ import annotations

import logging
import os
import posixpath

from dgaug.core.atomic import temporary_name
from dgaug.core.storage import Storage

log = logging.getLogger(__name__)

# open_clip reads sizes.json only beside the FIRST shard of `--train-data` and looks every shard
# up by its base name, so shards of several folders joined with `::` need one folder of unique
# names: real/00000.tar is mix/real-00000.tar, edsam/00000.tar is mix/edsam-00000.tar.
MIX_DIR = "mix"
SIZES = "sizes.json"


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
    """Remove links (and half-made temporaries) that name no committed shard; returns how many."""
    removed = 0
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        stale_link = os.path.islink(path) and name not in keep
        if stale_link or name.endswith(".tmp"):
            os.unlink(path)
            removed += 1
    return removed


def write_mix(storage: Storage, tar_sizes: dict[str, dict[str, int]]) -> dict[str, int] | None:
    """Sync `mix/` with the committed shards in `tar_sizes`; returns mix/sizes.json's content.

    Idempotent: links already right are left alone, wrong ones replaced, stale ones removed.
    None when there is nothing to link or the output is not a local folder.
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
    for name, (target, _) in sorted(entries.items()):
        _link(folder, name, target)
    # Links first, then sizes: every shard a reader can name in sizes.json is already linked.
    sizes = {name: n for name, (_, n) in entries.items()}
    storage.write_json(f"{MIX_DIR}/{SIZES}", sizes)
    removed = _remove_stale(folder, set(entries))
    log.info("%s/: %d shard link(s), %d stale removed", MIX_DIR, len(entries), removed)
    return sizes


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
