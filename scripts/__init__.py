"""Repository tools, not part of the installed package: generators of committed files
(``monitoring.py``) and deployment helpers (``compose_nodes.py``). Run them from a
checkout with fedsd installed (``make install``); tests import them as ``scripts.*``."""
