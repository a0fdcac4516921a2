"""Acceptance matrix: how ``recipes/train.py`` copes with a hostile user, bad inputs and broken runs.

Every case runs the trainer as a subprocess (nothing here imports ucfvit) and is judged by generic
criteria written next to it. ``harness`` holds what the cases share, one module per category holds
its cases, ``registry`` lists the categories, ``__main__`` runs the whole matrix (usage there) and
``test_acceptance`` runs one case per category under pytest.
"""
