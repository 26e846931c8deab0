"""Format rule tables. Importing this package registers every format with the engine."""

from converters.formats import diffusers_old  # noqa: F401
from converters.formats import dit  # noqa: F401
from converters.formats import dit_newest  # noqa: F401
from converters.formats import flux2  # noqa: F401
from converters.formats import flux_extra  # noqa: F401
from converters.formats import kohya  # noqa: F401
from converters.formats import kohya_flux  # noqa: F401
from converters.formats import peft  # noqa: F401
from converters.formats import z_image  # noqa: F401
from converters.formats import ltx2  # noqa: F401
