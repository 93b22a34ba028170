"""Every knob of the package, torch-free: each default once (:mod:`.defaults`), the solver configs and their
registry (:mod:`.solvers`), the problem-level config (:mod:`.problem`) and the analysis and correction configs
(:mod:`.analysis`).

Every entry point (the callback, the functional API, ``correct_errors``, the command line) reads its defaults
from here. Configs validate themselves in ``__post_init__``, so a config that exists is a valid one.
"""

from lightning_influence.config.analysis import *  # noqa: F403
from lightning_influence.config.defaults import *  # noqa: F403
from lightning_influence.config.problem import *  # noqa: F403
from lightning_influence.config.solvers import *  # noqa: F403
