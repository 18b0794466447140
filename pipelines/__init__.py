"""The Ruyi Flow KFP pipeline: the DAG (dag.py) and how to compile and run it (run.py)."""
