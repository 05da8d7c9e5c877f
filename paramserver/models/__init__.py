"""Ready training programs that run on a paramserver cluster.

* ``logreg.py``: sparse logistic regression with FTRL-Proximal (the OSDI 2014 paper's application)
"""
