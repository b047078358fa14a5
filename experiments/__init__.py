"""The registered experiments: every row of the paper's Tables 1-4 (:mod:`experiments.paper`) and the ablations
the paper lacks (:mod:`experiments.ablations`). Importing this package registers them with
:mod:`lowrank_vit.registry`; ``lowrank-vit list`` shows them."""

from experiments import ablations, paper  # noqa: F401  (imported for their registrations)
