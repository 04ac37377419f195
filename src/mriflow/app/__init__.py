"""`mriflow app`: a browser UI on the loopback interface (FastAPI + uvicorn, a small static front end, NiiVue).

    paths.py    every file a request names is resolved inside one of the app's roots, or refused
    niivue.py   where the npm-installed NiiVue bundle is (node_modules/@niivue/niivue/dist or $MRIFLOW_NIIVUE)
    jobs.py     generation jobs: one sample per request, written into the output folder, progress by network calls
    turing.py   the visual Turing test: the items (real test split vs generated), their order per rater
    store.py    the answers in SQLite (WAL, one row per (rater, item)) and the results with exact intervals
    server.py   the FastAPI application and `serve` (refuses a taken port, binds 127.0.0.1 unless told)
    static/     index.html (generate and view), turing.html, results.html, reports.html, app.js, app.css
"""
