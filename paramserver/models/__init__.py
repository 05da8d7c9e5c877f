"""Ready training programs that run on a paramserver cluster.

* ``program.py``: the skeleton they share (flags, cluster set-up, epochs, job-wide stats)
* ``report.py``: progress bars, per-epoch lines, JSON / CSV / PNG / TensorBoard output
* ``ctr.py``: the click data of logreg and deepfm (built-in sets, or a user's file)
* ``logreg.py``: sparse logistic regression with FTRL-Proximal (the OSDI 2014 paper's application)
* ``deepfm.py``: DeepFM, embeddings on the servers, the MLP in dense tables
* ``word2vec.py``: skip-gram with negative sampling
* ``mlp.py``: an MLP classifier, dense tables only
* ``demo.py``, ``baselines.py``: ``paramserver demo`` and its single-process references
"""
