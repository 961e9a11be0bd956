"""How tunelab talks: its own lines at INFO, libraries only when something is wrong.

Shared by the command line and every process a distributed run starts, so that N processes do not
print N copies of each library's notices.
"""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if not verbose else logging.DEBUG, stream=sys.stderr, format="[tunelab] %(message)s"
    )
    logging.getLogger("tunelab").setLevel(logging.INFO)
    # kernels: bitsandbytes (imported by peft where installed) looks up a kernel and, offline, warns it skipped a
    # publisher check, in runs that quantize nothing
    libraries = ("transformers", "peft", "accelerate", "datasets", "torch", "httpx", "matplotlib", "bitsandbytes")
    for noisy in (*libraries, "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    # accelerate imports DeepSpeed whenever it is installed; on a machine without a GPU its import warns that it
    # fell back to the CPU, in runs that never use it (a run that does use it says so itself)
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # weight loading/saving bars; the training bar is tunelab's own
    except ImportError:
        pass
