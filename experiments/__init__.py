"""The registered experiments: every row of the paper's Tables 1-4 (:mod:`experiments.paper`), the ablations
the paper lacks (:mod:`experiments.ablations`) and the comparison with the other decompositions
(:mod:`experiments.compare`), and VMeanba and the low-rank recipe on vision state-space models
(:mod:`experiments.ssm`). Importing this package registers them with :mod:`lowrank_vit.repro.registry`;
``lowrank-vit list`` shows them."""

from . import ablations, compare, paper, ssm  # noqa: F401  (imported for their registrations)
