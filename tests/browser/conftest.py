"""The browser tests drive batch.ipynb through JupyterLab themselves; nbval must not run it."""

collect_ignore_glob = ["*.ipynb", "node_modules"]
