"""Training: the state and the paper's recipe (``train_state``), the data-parallel steps
(``steps``), the loop (``loop``: ``train_and_evaluate``), what keeps a run safe
(``runtime``) and what it shows (``progress``), checkpoints (``checkpoints``), a model
from any source (``weights``), Table 2's ensembles (``ensemble``) and the from-scratch
control of transfer (``scratch``)."""
