"""What every absl entry point shares: distributed flags, help, variant lists, one-line errors.

--help / --helpshort list the entry point's own flags, --helpfull every flag (absl's usage, exit
1). `--config=configs/FILE.py:list` prints FILE's variants, one line each, and
exits 0 without loading any variant or training.

Exit status: 2 for bad input (a config value, a flag, a file), 3 when the run stops on a
fault of its own (the loss diverged with config.nan_policy='stop', a checkpoint could not be
written): one line on stderr either way, the traceback only with --traceback.

Logs: INFO and WARNING records of third-party libraries (tensorflow_datasets' "Reusing
dataset ..." blocks at every reopen, orbax, grain, etils, absl's own) are dropped; their
ERRORs stay. --third_party_logs, or a raised --verbosity (>= 1), shows them all again.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging as absl_logging

_COORDINATOR = "coordinator_address"
_SHOW_TRACEBACK = "traceback"

# Errors that mean "the input is wrong", not "the code is wrong".
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, PermissionError,
               NotADirectoryError, IsADirectoryError, TimeoutError, flags.Error)
# Faults of the run: a diverged loss (trainer.NonFiniteLossError), a disk that is full.
RUN_FAULTS = (FloatingPointError, OSError)
EXIT_BAD_INPUT, EXIT_FAULT = 2, 3
_THIRD_PARTY_LOGS = "third_party_logs"
# Where the records of the libraries whose INFO/WARNING chatter is dropped come from.
THIRD_PARTY = tuple(f"{os.sep}{name}{os.sep}" for name in (
    "tensorflow_datasets", "tensorflow", "orbax", "grain", "etils", "absl", "array_record"))


class ThirdPartyFilter(absl_logging.logging.Filter):
  """Drops records below ERROR logged from a THIRD_PARTY package's files."""

  def filter(self, record):
    if record.levelno >= absl_logging.logging.ERROR:
      return True
    return not any(part in (record.pathname or "") for part in THIRD_PARTY)


def quiet_third_party_logs() -> None:
  """Adds ThirdPartyFilter to absl's handler and the root logger's handlers (once)."""
  handlers = [absl_logging.get_absl_handler(), *absl_logging.logging.getLogger().handlers]
  for handler in handlers:
    if not any(isinstance(f, ThirdPartyFilter) for f in handler.filters):
      handler.addFilter(ThirdPartyFilter())


def define_distributed_flags() -> None:
  flags.DEFINE_string(_COORDINATOR, None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_float("coordinator_timeout_s", 120.0, "Give up on the coordinator after this.")
  flags.DEFINE_bool(_SHOW_TRACEBACK, False, "Print the full traceback for input errors.")


def start_distributed() -> None:
  from sharding import mesh  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  mesh.initialize_distributed(f[_COORDINATOR].value, f.num_processes, f.process_id,
                              timeout_s=f.coordinator_timeout_s)


def check_workdir(path: str) -> None:
  if path.startswith("gs://"):
    return
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".write_test")
    with open(probe, "w") as fh:
      fh.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={path}: cannot be written ({e.strerror}).") from None


def _one_line(e: BaseException, argv=()) -> str:
  filename = getattr(e, "filename", None)
  if isinstance(e, OSError) and filename and e.strerror:
    # Name the flag that gave the path, e.g. "--csv=x.csv: No such file or directory".
    given = [a for a in argv if a.startswith("--") and a.endswith(f"={filename}")]
    return f"error: {given[0] if given else filename}: {e.strerror}."
  text = str(e).strip().strip('"').splitlines()
  return f"error: {text[0] if text else type(e).__name__}"


def _config_file_error(e: BaseException, argv) -> str | None:
  """ml_collections defers a config file that failed to load until its first use."""
  text = str(e)
  if "failure to load" not in text and "Failed loading config file" not in text:
    return None
  given = [a for a in argv if a.startswith("--config=")]
  reason = [l.strip() for l in text.splitlines() if l.strip()][-1]
  return (f"error: {given[0] if given else '--config'}: cannot load it ({reason}); pass an "
          "existing config file, FILE.py or FILE.py:variant.")


def _flag_error(e: BaseException, argv) -> str:
  if isinstance(e, AttributeError):  # ml_collections: an override names no config field
    # Its message is the quoted name, possibly escaped, and a 'Did you mean "x"' line.
    names = re.findall(r"[A-Za-z_]\w*", str(e).split("Did you mean")[0].replace("\\n", " "))
    key = names[0] if names else str(e)
    given = [a.split("=")[0].lstrip("-") for a in argv
             if a.split("=")[0].split(".")[-1] == key]
    where = given[0] if given else key
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    if hint:
      return f"error: --{where}: the config has no field {key!r}; did you mean {hint.group(1)!r}?"
    return (f"error: --{where}: the config has no field {key!r} (see the config file's "
            "fields, or drop the override).")
  text = str(e)
  if "Traceback (most recent call last)" in text:  # config file raised: keep its last line
    lines = [l for l in text.splitlines() if l.strip()]
    return f"error: {lines[0].split(':')[0]}: {lines[-1].split(': ', 1)[-1]}"
  if isinstance(e, flags.UnrecognizedFlagError):
    return f"error: {text.strip()} (--helpfull lists the valid flags)."
  for pattern, valid in (("invalid literal for int()", "an integer"),
                         ("could not convert string to float", "a number"),
                         ("Non-boolean argument", "true or false")):
    if pattern in text:
      return f"error: {text.split(': ')[0]}: expected {valid}."
  return _one_line(e).replace("\n", " ")


def _listed_config(argv) -> str | None:
  """PATH of `--config=PATH:list` (or `--config PATH:list`) on the command line, else None."""
  suffix = ":list"  # configs.common.LIST (not imported: it imports sharding)
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    if arg in ("--config", "-config") and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(("--config=", "-config=")):
      value = arg.split("=", 1)[1]
    else:
      continue
    if value.endswith(suffix):
      return value[:-len(suffix)]
  return None


def _print_variants(path: str) -> int:
  from configs import common  # pylint: disable=g-import-not-at-top
  try:
    print(common.format_variants(path), flush=True)
  except Exception as e:  # noqa: BLE001 - a config file that does not import is bad input
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"error: --config={path}:{common.LIST}: cannot list its variants ({reason}).",
          file=sys.stderr)
    return EXIT_BAD_INPUT
  return 0


def run(main) -> int:
  """app.run(main) where bad input exits 2 with one line (traceback with --traceback).

  absl's help flags are defined before the command line is parsed here, so --help/--helpfull
  print the usage and exit as under a plain app.run; `--config=FILE.py:list` lists variants.
  """
  def wrapped(argv):
    if not flags.FLAGS[_THIRD_PARTY_LOGS].value and flags.FLAGS["verbosity"].value < 1:
      quiet_third_party_logs()
    try:
      return main(argv)
    except (*USER_ERRORS, *RUN_FAULTS) as e:
      if flags.FLAGS[_SHOW_TRACEBACK].value:
        traceback.print_exc()
      config_line = _config_file_error(e, sys.argv)
      print(config_line or _one_line(e, sys.argv), file=sys.stderr)
      bad_input = config_line is not None or isinstance(e, USER_ERRORS)
      sys.exit(EXIT_BAD_INPUT if bad_input else EXIT_FAULT)
  listed = _listed_config(sys.argv)
  if listed is not None:
    return _print_variants(listed)
  app.define_help_flags()  # app.run defines them too, but only after our parse below
  if _THIRD_PARTY_LOGS not in flags.FLAGS:
    flags.DEFINE_bool(_THIRD_PARTY_LOGS, False, "Show the INFO/WARNING logs of third-party "
                      "libraries (tensorflow_datasets, orbax, grain, ...), dropped by default.")
  try:
    argv = flags.FLAGS(sys.argv)  # parse here, so a bad flag or config key exits 2 in one line
  except Exception as e:  # noqa: BLE001 - everything raised while parsing is bad input
    print(_flag_error(e, sys.argv), file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    app.run(wrapped, flags_parser=lambda _: argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0
