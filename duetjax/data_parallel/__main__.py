"""``python -m duetjax.data_parallel FD``: a replica process (``replica.main``), started by
``DataParallelEngine``. It runs from here, not as ``replica`` itself, so that the classes it
pickles are named by their module, not by ``__main__``."""
import sys

from .replica import main

sys.exit(main())
