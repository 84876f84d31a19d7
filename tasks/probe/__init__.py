"""The bias and robustness probe, and its gate on promotion: suites (what to check), scoring (how a model does,
below the objectives, which call it), the gate (whether a tuned model may become champion) and the report and
stages (report.py, above the objectives). Import from the modules: this package imports none of them, so that the
objectives can use the scoring without loading the stages."""
