"""How results are shown: what a report is made of, as data (``content``: sections, the
context they are computed from, tables), static HTML pages (``pages``) and PNG figures
(``figures``)."""
