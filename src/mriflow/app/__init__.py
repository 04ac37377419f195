"""`mriflow app`: a browser UI on the loopback interface (FastAPI + uvicorn, a small static front end, NiiVue).

    paths.py     every file a request names is resolved inside one of the app's roots, or refused
    bodies.py    what a request may send: a bounded JSON body, fields of the right type (else 4xx, one line)
    niivue.py    where the npm-installed NiiVue bundle is (node_modules/@niivue/niivue/dist or $MRIFLOW_NIIVUE)
    jobs.py      generation jobs: one sample per request, written into the output folder, progress by network
                 calls, bounded work per request and a bounded queue
    encoding.py  how a Turing item is served: one encoder for every volume, so only the image differs
    turing.py    the visual Turing test: the items (real test split vs generated), their fingerprint
    store.py     the answers in SQLite (WAL, one row per (rater, item), one study per file) and the results with
                 exact intervals
    server.py    the FastAPI application (a Turing test's results for its owner's token alone)
    launch.py    `mriflow app`: arguments checked, the answer database placed outside every served folder, the
                 socket bound (127.0.0.1 unless told), the addresses and the owner's link printed
    static/      index.html (generate and view), turing.html, results.html, reports.html, their scripts, app.css
"""
