"""The remote inference system: `tandem serve`, an Open Inference Protocol v2 server for a repository of
bundles, with batching, versions, metrics, auth, a prediction and feedback store, and a web page.

    tandem serve models/ --port 8000            # models/<name>/<version>/ are bundles
    tandem client http://127.0.0.1:8000 cat.jpg

Never imports torch. See app.py for the endpoints, config.py for the settings.
"""
