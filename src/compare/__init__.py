"""`python -m src.compare`: which strategy, backbone or setting is best on this data, and is the difference real?

runs.py reads runs from MLflow, analysis.py groups and compares them, stats.py holds the statistics, report.py and
plots.py write the report, cli.py is the command line.
"""
