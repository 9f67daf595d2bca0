"""What the executor's fork server imports once for every worker it forks (executor.PRELOAD).

The libraries are quieted first, as a worker does before its imports (bitsandbytes, imported by
PEFT, prints an advisory on import); then the heavy imports a worker needs anyway.
"""

from peftlab.cli import quiet_libraries

quiet_libraries()

import datasets  # noqa: E402, F401
import peft  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401

import peftlab.experiment  # noqa: E402
import peftlab.worker  # noqa: E402, F401
