"""What a run records, epoch by epoch: metrics.csv (one row per network and epoch, plus the
ensemble; its columns are the names the rows carry) and TensorBoard scalars; and reading
metrics.csv back (demo.py's curves, experiments/summarize.py)."""
import csv
import os

from checkpoints import atomic_write
from errors import UsageError


def read_metrics(run_dir):
    """{network label: {column: [(epoch, value), ...]}} from a run's metrics.csv: every numeric column
    a network's rows have values in, by epoch; None without the file. A file that is not UTF-8 CSV
    with an epoch and a net column, or a cell that is not a number, raises ValueError in one line
    naming the file and the line."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return None

    def number(kind, text, column):
        try:
            return kind(text)
        except (TypeError, ValueError):  # TypeError: None, the cell of a row shorter than the header
            raise ValueError(f"{path}, line {reader.line_num}: {column} {text!r} is not a number") from None

    series = {}
    # utf-8-sig: a file saved by a spreadsheet may start with a byte-order mark, which would glue onto "epoch"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            if reader.fieldnames is None:  # an empty file: no epoch recorded yet
                return {}
            if not {"epoch", "net"} <= set(reader.fieldnames):
                raise ValueError(f"{path}, line 1: the header has no epoch and net columns")
            for row in reader:
                columns = series.setdefault(row["net"], {})
                epoch = number(int, row["epoch"], "epoch")
                for key, value in row.items():
                    if key not in (None, "epoch", "net", "model") and value:
                        columns.setdefault(key, []).append((epoch, number(float, value, key)))
        except UnicodeDecodeError as error:  # decoded in blocks, so the line is where the block starts
            raise ValueError(f"{path}, near line {reader.line_num + 1}: not UTF-8 text ({error.reason})") from None
        except csv.Error as error:  # raised before the reader counts the line it fails on
            raise ValueError(f"{path}, line {reader.line_num + 1}: {error}") from None
    return {net: {key: sorted(values) for key, values in columns.items()} for net, columns in series.items()}


class MetricsLog:
    """metrics.csv (one row per epoch per network, plus the ensemble; its columns are the names the
    rows carry) and TensorBoard scalars, written by the main process."""

    def __init__(self, run_dir, rt, start_epoch, *, resumed):
        self.enabled, self.writer = rt.is_main, None
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        try:
            read_metrics(run_dir)  # an earlier file must be one this repository wrote
        except ValueError as error:
            raise UsageError(f"{error}; move it away to continue the run (its checkpoint holds the state, not this file)") from None
        self._rewrite(keep_through=start_epoch)  # a resumed run trains the later epochs again
        try:
            from torch.utils.tensorboard import SummaryWriter  # slow to import, and only rank 0 needs it
        except ImportError as error:
            print(f"warning: TensorBoard unavailable ({error}); metrics.csv is still written", flush=True)
            return
        # A restarted run would otherwise leave a second event file repeating the redone steps.
        self.writer = SummaryWriter(run_dir, purge_step=start_epoch + 1 if resumed else None)

    def _rewrite(self, keep_through, new_rows=()):
        """Rewrite the CSV atomically with its rows of epochs <= keep_through, then `new_rows`."""
        rows, columns = [], []
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = [r for r in reader if int(r["epoch"]) <= keep_through]
        if not (rows or new_rows) and not os.path.exists(self.csv_path):
            return
        for row in new_rows:
            columns += [key for key in row if key not in columns]

        def write(f):
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
            writer.writerows({k: _fmt(v) for k, v in row.items()} for row in new_rows)

        atomic_write(self.csv_path, write, mode="w")

    def write(self, epoch, rows):
        """Record epoch `epoch`'s rows (dicts of column name -> value)."""
        if not self.enabled:
            return
        self._rewrite(keep_through=epoch - 1, new_rows=rows)
        if self.writer is None:
            return
        for row in rows:
            for key, value in row.items():
                if key not in ("epoch", "net", "model") and isinstance(value, (int, float)):
                    split, _, metric = key.partition("_")
                    self.writer.add_scalar(f"{split}/{metric}/{row['net']}" if metric else f"{key}/{row['net']}", value, epoch)
        self.writer.flush()

    def close(self):
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()


def _fmt(value):
    """CSV cell: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value
