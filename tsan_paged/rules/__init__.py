"""Built-in rules, one module per library. Importing this package registers them.

Rule modules never import the library they cover: a target whose module is not imported
is wrapped when (if) it is.
"""

from . import flash_attn  # noqa: F401
from . import flash_mla  # noqa: F401
from . import flashinfer  # noqa: F401
from . import sglang  # noqa: F401
from . import vllm  # noqa: F401
