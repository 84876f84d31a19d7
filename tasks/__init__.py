"""The pipeline stages as plain, typed functions (the Prefect @task layer lives in flows/stages.py)."""
