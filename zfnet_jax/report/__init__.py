"""The report of a run (``report``), what a model sees in your photographs
(``visualize``) and the explorer (``explore``): pages made of the analyses."""
