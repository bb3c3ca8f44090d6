"""What a run records, epoch by epoch: metrics.csv (one row per network and epoch, plus the
ensemble; its columns are the names the rows carry) and TensorBoard scalars; and reading
metrics.csv back (demo.py's curves, experiments/summarize.py)."""
import csv
import json
import os
import re
import uuid

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
    rows carry), TensorBoard scalars and, with --log-wandb, Weights & Biases, written by the main process.

    TensorBoard: each row's numbers as SPLIT/METRIC/NETWORK at the epoch; a custom-scalars layout that puts
    the networks of one quantity on one chart; the run's arguments as text; at the end the arguments and
    the final accuracies as hparams. The --log-every scalars go to the steps/ folder (their own
    TensorBoard run, on the axis of training steps, purged apart from the epochs' on a resume)."""

    def __init__(self, run_dir, rt, start_epoch, *, resumed, args=None, first_step=0):
        self.enabled, self.writer, self.step_writer, self.wandb = rt.is_main, None, None, None
        self.csv_path, self.args, self.charts = os.path.join(run_dir, "metrics.csv"), args, {}
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        try:
            read_metrics(run_dir)  # an earlier file must be one this repository wrote
        except ValueError as error:
            raise UsageError(f"{error}; move it away to continue the run (its checkpoint holds the state, not this file)") from None
        self._rewrite(keep_through=start_epoch)  # a resumed run trains the later epochs again
        if args is not None and getattr(args, "log_wandb", False):
            self.wandb = start_wandb(args, run_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter  # slow to import, and only rank 0 needs it
        except ImportError as error:
            print(f"warning: TensorBoard unavailable ({error}); metrics.csv is still written", flush=True)
            return
        # A restarted run would otherwise leave a second event file repeating the redone steps.
        self.writer = SummaryWriter(run_dir, purge_step=start_epoch + 1 if resumed else None)
        if args is not None:
            self.writer.add_text("arguments", "    " + json.dumps(arguments(args), indent=1).replace("\n", "\n    "), start_epoch)
            if getattr(args, "log_every", 0):  # the folder is made at the first step scalars (none in a short run)
                self.step_writer = lambda: SummaryWriter(os.path.join(run_dir, "steps"), purge_step=first_step + 1 if resumed else None)

    @property
    def logs_steps(self):
        """True when the --log-every scalars go somewhere (TensorBoard or wandb)."""
        return self.step_writer is not None or self.wandb is not None

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
        scalars = {}
        for row in rows:
            for key, value in row.items():
                if key not in ("epoch", "net", "model") and isinstance(value, (int, float)):
                    split, _, metric = key.partition("_")
                    scalars[f"{split}/{metric}/{row['net']}" if metric else f"{key}/{row['net']}"] = value
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": epoch})
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self._chart(tag for tag in scalars)
        self.writer.flush()

    def write_step(self, step, scalars):
        """Record the --log-every scalars {tag: value} at training step `step`."""
        if self.wandb is not None:
            self.wandb.log({**scalars, "step": step})
        if callable(self.step_writer):
            self.step_writer = self.step_writer()
        if self.step_writer is not None:
            for tag, value in scalars.items():
                self.step_writer.add_scalar(tag, value, step)
            self._chart(scalars)
            self.step_writer.flush()

    def _chart(self, tags):
        """Extend the custom-scalars layout (TensorBoard's Custom Scalars tab) with one chart per quantity
        (the tag without its network) holding every network's curve, for the quantities not charted yet."""
        new = {tag.rpartition("/")[0] for tag in tags} - set(self.charts)
        if not new:
            return
        self.charts.update({quantity: ["Multiline", [f"^{re.escape(quantity)}/"]] for quantity in new})
        self.writer.add_custom_scalars({"the networks side by side": {q.replace("/", " "): chart for q, chart in sorted(self.charts.items())}})

    def close(self, results=None):
        """Close the writers; with the run's final `results` (results.json's), first record its arguments and
        final accuracies as TensorBoard hparams and in the wandb run's summary."""
        final = {} if results is None else {f"final/{key}/{entry['net']}": entry[key] for entry in results["networks"]
                                             for key in ("final_test_acc", "final_val_acc", "best_val_acc", "test_acc_at_best_val")
                                             if entry.get(key) is not None}
        if self.writer is not None and final and self.args is not None:
            # what SummaryWriter.add_hparams writes, into this run's own event file rather than a new one
            from torch.utils.tensorboard.summary import hparams
            values = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                      for key, value in arguments(self.args).items()}
            for summary in hparams(values, final):
                self.writer.file_writer.add_summary(summary)
            for tag, value in final.items():
                self.writer.add_scalar(tag, value, int(results["epochs"]))
        for writer in (self.writer, self.step_writer):
            if writer is not None and not callable(writer):
                writer.close()
        self.writer = self.step_writer = None
        if self.wandb is not None:
            self.wandb.summary.update(final)
            self.wandb.finish()
            self.wandb = None


def arguments(args):
    """The run's flags as recorded in args.json (JSON values)."""
    return json.loads(json.dumps(vars(args), default=str))


def start_wandb(args, run_dir):
    """The Weights & Biases run of --log-wandb (flags.check_args made sure wandb imports): files under
    RUN_DIR/wandb, the flags as its config, and an id kept in RUN_DIR/wandb_id so that a resume continues it."""
    import wandb
    id_file = os.path.join(run_dir, "wandb_id")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]  # letters and digits, as wandb takes for an id
        atomic_write(id_file, lambda f: f.write(run_id + "\n"), mode="w")
    return wandb.init(project=args.wandb_project, name=os.path.basename(os.path.normpath(run_dir)), dir=run_dir,
                      id=run_id, resume="allow", config=arguments(args))


def _fmt(value):
    """CSV cell: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value
