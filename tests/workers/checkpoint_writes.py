"""`ddl train ARGS...` in this process, with every checkpoint write recorded: prints the steps written as JSON
(the last line of stdout)."""

import json
import sys

from ddl_apps import cli
from ddl_apps.core import checkpoint

written = []
write_checkpoint = checkpoint.write_checkpoint


def recording(root, step, write_files, keep, *sharded):
    written.append(step)
    return write_checkpoint(root, step, write_files, keep, *sharded)


checkpoint.write_checkpoint = recording
try:
    cli.main(["train", *sys.argv[1:]], standalone_mode=False)
finally:
    print(json.dumps(written))
