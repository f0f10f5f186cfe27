"""Bad inputs: skip markers, the tracker that counts them and stops a bad run, their replacement.

Sources and transforms never raise on a broken input (unreadable, truncated, empty or non-image
file, malformed JSONL or table row, an image with a side below data.min_image_side). They return a
*skip marker* instead,

  {'_skip': reason, 'path': file or table, 'index': record index, 'epoch': its epoch, if known}

and every later transform passes a marker through untouched. `SkipTracker` counts the markers, so
no bad record goes by silently: each is logged (absl, with its path and reason), counted, and the
run stops with `TooManyBadRecords` naming the worst files once more than `max_skip_ratio` of the
records seen were bad. The training pipeline then puts a good record in the bad one's place
(`ReplaceBadRecords`), so a bad record never shifts the records after it: every process keeps its
rows of every global batch, and a run reads the same batches whatever its number of processes.

The ratio is checked once `min_seen` records (default 100) have been seen, so a single early bad
file does not stop a run on a noisy first few records, and always at the end of an epoch (after
`epoch_size` records), so a small dataset with too many bad files is still caught.

Place the tracker where the main process runs it (after Grain's multiprocess prefetch): a tracker
inside a worker process counts only that worker's records.
"""

from collections.abc import Callable, Mapping
import collections
import itertools
import threading
from typing import Any

from absl import logging
import grain
import numpy as np

SKIP = "_skip"
DEFAULT_MIN_SEEN = 100
# Records drawn to replace a bad one: with a tenth of the data bad, all of them are bad once in
# 1e64 replacements, so a miss means nearly all the data is bad.
REPLACEMENT_TRIES = 64
# With several processes a miss is followed by up to this many records after the bad one in
# order, so that one process does not give up alone while the others wait for it in a step.
REPLACEMENT_SCAN = 4096
_REPLACEMENT_STREAM = 0x5E71ACE  # keeps the draws apart from the run's other uses of its seed


class TooManyBadRecords(RuntimeError):
  """More than `max_skip_ratio` of the records seen were unreadable or unusable.

  An entry module reports it as one `error:` line (robust_u1_jax/cli.py) followed by the worst
  files and the other most recent skips, indented."""


def skip_record(reason: str, path: str | None, index: int | None,
                epoch: int | None = None) -> dict:
  """The marker a source or transform returns instead of raising on bad input. A transform after
  the epoch is tagged passes the record's epoch on, for `ReplaceBadRecords`."""
  marker = {SKIP: str(reason), "path": "" if path is None else str(path),
            "index": -1 if index is None else int(index)}
  if epoch is not None:
    marker["epoch"] = int(epoch)
  return marker


def line_place(line: int, lines_file: str | None, path: str | None) -> str:
  """'line N' of a record read from a line of `lines_file` (a JSONL), ' of <lines_file>' added
  where the bad record's `path` names another file (the row's image)."""
  return f"line {line}" if not lines_file or path == lines_file else f"line {line} of {lines_file}"


def is_skip(record: Any) -> bool:
  """Whether `record` is a skip marker (a bad input the tracker counts; training replaces it,
  the evaluation leaves it out)."""
  return isinstance(record, Mapping) and SKIP in record


class SkipTracker(grain.transforms.Filter):
  """Counts skip markers; raises `TooManyBadRecords` past `max_skip_ratio`.

  `filter(record)` returns False for a marker and True otherwise: as a Grain filter it drops the
  marker (the evaluation's tables), under `ReplaceBadRecords` the marker is replaced (training).
  Thread-safe. `metrics()` gives {'skipped', 'seen', 'skip_ratio'}, where 'skipped' counts the
  bad records, replaced or dropped.

  Args:
    max_skip_ratio: largest tolerated fraction of bad records (data.max_skip_ratio).
    min_seen: records to see before the ratio is enforced mid-epoch.
    epoch_size: records per epoch as this tracker sees them (the per-process slice); every
      `epoch_size` records the ratio is enforced regardless of `min_seen`. None: only when
      `end_epoch()` is called.
    keep: how many worst files and most recent skips an error message names.
    name: what the data is, for messages (e.g. "train data").
    setting: the setting that raises the limit, for messages.
    log: False leaves the bad records unlogged (read a second time, already logged once).
    enforce: False only counts and logs; the caller then enforces the ratio on totals of its
      own with `check` (the trainer's, over every process, so all of them stop together).
  """

  def __init__(self, max_skip_ratio: float = 0.01, *, min_seen: int = DEFAULT_MIN_SEEN,
               epoch_size: int | None = None, keep: int = 10, name: str = "data",
               enforce: bool = True, setting: str = "data.max_skip_ratio", log: bool = True):
    if not 0.0 <= max_skip_ratio < 1.0:
      raise ValueError(f"max_skip_ratio={max_skip_ratio!r} is invalid: use a fraction in [0, 1)")
    if min_seen < 1:
      raise ValueError(f"min_seen={min_seen!r} is invalid: use an integer >= 1")
    if epoch_size is not None and epoch_size < 1:
      raise ValueError(f"epoch_size={epoch_size!r} is invalid: use a positive integer or None")
    self.max_skip_ratio = float(max_skip_ratio)
    self.min_seen = int(min_seen)
    self.epoch_size = epoch_size
    self.keep = int(keep)
    self.name = name
    self.enforce, self.setting, self.log = bool(enforce), setting, bool(log)
    self._lock = threading.Lock()
    self.seen = 0
    self.skipped = 0
    # Per file: how many of its records were bad, and the latest (index, reason). A TSV or
    # parquet file with many bad rows counts as one file with a high count.
    self._per_path: dict[str, int] = collections.Counter()
    self._last_reason: dict[str, tuple[int, str]] = {}
    self._recent: collections.deque = collections.deque(maxlen=self.keep)
    self.crossed = False  # a check raised: the ratio stopped (or would have stopped) the run

  # Locks do not pickle; Grain may copy transforms into worker processes.
  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def filter(self, element) -> bool:
    bad = is_skip(element)
    with self._lock:
      self.seen += 1
      if bad:
        self.skipped += 1
        path, index, reason = element.get("path", ""), element.get("index", -1), element[SKIP]
        self._per_path[path] += 1
        self._last_reason[path] = (index, reason)
        self._recent.append((path, index, reason))
      epoch_done = self.epoch_size is not None and self.seen % self.epoch_size == 0
      seen, skipped = self.seen, self.skipped
    if bad and self.log:  # the epoch: a bad file is met (and logged) again in every epoch
      epoch = f", epoch {element['epoch']}" if "epoch" in element else ""
      logging.warning("%s: bad record %s (index %s%s): %s", self.name, path or "<no path>", index,
                      epoch, reason)
    # Good records only lower the ratio, so checking at each bad record, on reaching min_seen and
    # at each epoch end catches every crossing.
    if self.enforce and (bad or epoch_done or seen == self.min_seen):
      self.check(seen, skipped, final=epoch_done)
    return not bad

  __call__ = filter

  def set_aside(self) -> None:
    """Restarts the counts of a run resumed from the checkpoint its bad-records stop saved
    (`Checkpointer.stopped_for_bad_records`): resumed, as its stop line says, once the data is
    mended, it would otherwise stop again for the records it stopped for. A record still bad is
    counted again when it is read."""
    with self._lock:
      seen, skipped = self.seen, self.skipped
      self.seen = self.skipped = 0
    if skipped:
      logging.warning("%s: the %d bad of %d records counted before this resume are set aside (the "
                      "run stopped for them); those still bad are counted again as they are read",
                      self.name, skipped, seen)

  def end_epoch(self) -> None:
    """Enforces the ratio now, however few records were seen (call at the end of an epoch)."""
    with self._lock:
      seen, skipped = self.seen, self.skipped
    self.check(seen, skipped, final=True)

  def metrics(self) -> dict[str, float]:
    with self._lock:
      return {"skipped": self.skipped, "seen": self.seen,
              "skip_ratio": self.skipped / self.seen if self.seen else 0.0}

  def worst(self, n: int | None = None) -> list[tuple[str, int, int, str]]:
    """Files with the most bad records: (path, bad count, latest index, latest reason)."""
    with self._lock:
      ranked = sorted(self._per_path.items(), key=lambda kv: (-kv[1], kv[0]))[:n or self.keep]
      return [(p, c, *self._last_reason[p]) for p, c in ranked]

  def recent(self) -> list[tuple[str, int, str]]:
    """The most recent skips, oldest first: (path, index, reason)."""
    with self._lock:
      return list(self._recent)

  def summary(self) -> str | None:
    """A line on the bad records read so far (None without any), for the end of a run: one that
    read fewer than `min_seen` records and no whole epoch was never checked against the ratio."""
    m = self.metrics()
    if not m["skipped"]:
      return None
    line = (f"{self.name}: {m['skipped']} of {m['seen']} records read were unreadable or unusable "
            f"({m['skip_ratio']:.2%}), each logged as it was read")
    if m["skip_ratio"] > self.max_skip_ratio:
      # A check that raised in records read ahead of the batches the run took stopped nothing.
      line += (f"; past {self.setting} ({self.max_skip_ratio:.2%}), which stops a run once "
               f"{self.min_seen} records or a whole epoch were read, "
               + ("as the records read ahead of this run's last batch were: the run had ended"
                  if self.crossed else "more than this run read"))
    return line

  def check(self, seen: int, skipped: int, *, final: bool, where: str = "") -> None:
    """Raises `TooManyBadRecords` when `skipped` of `seen` records is past the ratio (mid-epoch
    only once `min_seen` were seen). The message names this tracker's worst files; `where` says
    whose records the counts are (e.g. " read by 2 processes")."""
    if not seen or (seen < self.min_seen and not final):
      return
    if skipped / seen <= self.max_skip_ratio:
      return
    ranked = self.worst()
    worst = "\n".join(f"  {p or '<no path>'}: {c} bad record(s), latest index {i}: {r}"
                      for p, c, i, r in ranked) or "  (none among this process's records)"
    # A skip the worst files' lines already show (a file's latest) is not listed twice.
    shown = {(p, i) for p, _, i, _ in ranked if p}  # records without a path are told apart
    recent = "\n".join(f"  {p or '<no path>'} (index {i}): {r}" for p, i, r in self.recent()
                       if (p, i) not in shown)
    self.crossed = True
    raise TooManyBadRecords(
        f"{self.name}: {skipped} of {seen} records{where} were unreadable or unusable "
        f"({skipped / seen:.2%} > max_skip_ratio {self.max_skip_ratio:.2%}"
        f"{'' if final else f', checked after at least {self.min_seen} records'}). "
        f"Fix or remove these inputs, or raise {self.setting}.\n"
        f"Worst files:\n{worst}" + (f"\nOther recent skips:\n{recent}" if recent else ""))


class ReplaceBadRecords(grain.transforms.Map):
  """Counts every record with `tracker`, and puts a good record in each bad one's place.

  The replacement is the first good record among `tries` records of the source drawn from
  (seed, the bad record's index, its epoch), made by `make_record(index, epoch)`: the pipeline's
  own per-record steps, so it is that record as its own reader makes it in that epoch (the same
  corruption and question draws). It depends on the bad record alone, not on which process reads
  it or what came before, so a bad record changes no other row: processes stay in step (a finite
  `data.num_epochs` ends on every process at the same step) and a run of N processes reads the
  batches of a run of one. The bad record is still logged and counted; its replacement is not.
  When every draw is bad, nearly all the data is: one process (the tracker enforcing) stops
  there; several first try up to REPLACEMENT_SCAN records after the bad one, in order, so a
  process gives up only where every process would.
  """

  def __init__(self, tracker: SkipTracker, make_record: Callable[[int, int], Any],
               num_records: int, seed: int, tries: int = REPLACEMENT_TRIES):
    self.tracker, self.make_record = tracker, make_record
    self.num_records, self.seed, self.tries = int(num_records), int(seed), int(tries)

  def map(self, element):
    if self.tracker.filter(element):
      return element
    index, epoch = int(element.get("index", -1)), int(element.get("epoch", -1))
    if index < 0 or epoch < 0:
      raise ValueError(f"{self.tracker.name}: a bad record without its source index and epoch "
                       f"({element}): every skip marker of a pipeline needs both")
    n = self.num_records
    drawn = np.random.default_rng([self.seed, index, epoch, _REPLACEMENT_STREAM]).integers(
        n, size=self.tries)
    scan = 0 if self.tracker.enforce else min(n, REPLACEMENT_SCAN)
    following = ((index + k) % n for k in range(1, scan + 1))
    for other in itertools.chain(drawn, following):
      record = self.make_record(int(other), epoch)
      if not is_skip(record):
        return record
    raise TooManyBadRecords(
        f"{self.tracker.name}: record {index} ({element.get('path') or '<no path>'}) is bad "
        f"({element[SKIP]}), and so are the {self.tries} records drawn to replace it"
        + (f" and the {scan} after it" if scan else "") + ": nearly all of this data is "
        "unreadable or unusable")
