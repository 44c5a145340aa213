"""SLMOps Studio: the web app, run store, job runner and CLI around the pipeline steps."""
