"""How results are shown: report sections as data (``sections``), static HTML pages
(``pages``) and PNG figures (``figures``)."""
