"""The studio's pages over results: prepared data (report, expert review), eval results (side-by-side
table, per-example view, blind A/B grading) and sweeps. Registered on the app by app.create_app."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse

from llamaforge.errors import ConfigError
from llamaforge.studio import data as data_mod
from llamaforge.studio import evals, grading, plans, sweeps


def register(app: FastAPI, studio, page) -> None:
    # ------------------------------------------------------------------ prepared data and review
    def prepared(did: str) -> Path:
        folder = data_mod.resolve_prepared(studio.workspace, did)
        if folder is None:
            raise HTTPException(404, f"no prepared dataset '{did}' in {studio.workspace}")
        return folder

    @app.get("/data", response_class=HTMLResponse)
    async def data_list(request: Request):
        found = [
            {"id": f.relative_to(studio.workspace).as_posix(), "report": data_mod.report(f)}
            for f in data_mod.find_prepared(studio.workspace)
        ]
        return page(request, "data_list.html", datasets=found)

    @app.get("/data/{did:path}/images/{name}")
    async def data_image(did: str, name: str):
        folder = prepared(did)
        if name not in (data_mod.report(folder).get("images") or []):
            raise HTTPException(404, f"no image {name} in the report")
        return FileResponse(folder / name)

    @app.get("/data/{did:path}", response_class=HTMLResponse)
    async def data_page(request: Request, did: str):
        folder = prepared(did)
        _, rows = data_mod.review_rows(folder)
        return page(request, "data.html", did=did, report=data_mod.report(folder), rows=rows)

    @app.post("/api/data/{did:path}/review")
    async def apply_review(request: Request, did: str):
        body = await request.json()
        verdicts = body.get("verdicts")
        if not isinstance(verdicts, dict):
            raise ConfigError("verdicts must map review ids to {verdict, edited_prompt, edited_answer, note}")
        from llamaforge.errors import DataError

        try:
            return await asyncio.to_thread(data_mod.apply_verdicts, prepared(did), verdicts)
        except DataError as exc:
            raise ConfigError(str(exc)) from None

    # ------------------------------------------------------------------ plan table
    @app.get("/plans", response_class=HTMLResponse)
    async def plans_page(
        request: Request,
        models: str = "",
        gpus: str = "",
        tokens_m: float | None = None,
        batch: int | None = None,
        seq: int | None = None,
    ):
        from llamaforge.planning.arch import shipped_archs

        chosen_models = [m for m in models.split(",") if m.strip()] or list(plans.DEFAULT_MODELS)
        chosen_gpus = [g for g in gpus.split(",") if g.strip()] or list(plans.DEFAULT_GPUS)
        tokens = tokens_m * 1e6 if tokens_m else None
        rows = await asyncio.to_thread(
            plans.plan_rows, chosen_models, chosen_gpus, batch=batch, seq=seq, tokens=tokens
        )
        return page(
            request,
            "plans.html",
            rows=rows,
            models=",".join(chosen_models),
            gpus=",".join(chosen_gpus),
            tokens_m=tokens_m,
            batch=batch,
            seq=seq,
            shipped=shipped_archs(),
        )

    # ------------------------------------------------------------------ sweeps
    @app.get("/sweeps", response_class=HTMLResponse)
    async def sweeps_page(request: Request):
        found = [
            {"id": f.relative_to(studio.workspace).as_posix(), **sweeps.sweep_table(f)}
            for f in sweeps.find_sweeps(studio.workspace)
        ]
        return page(request, "sweeps.html", sweeps=found)

    @app.get("/sweeps/{sid:path}/chart.png")
    async def sweep_chart(sid: str):
        folder = sweeps.resolve_sweep(studio.workspace, sid)
        png = await asyncio.to_thread(sweeps.chart, folder) if folder else None
        if png is None:
            raise HTTPException(404, f"no chart for sweep '{sid}'")
        return Response(png, media_type="image/png")

    # ------------------------------------------------------------------ eval results
    @app.get("/evals", response_class=HTMLResponse)
    async def evals_page(request: Request):
        found = []
        for folder in evals.find_evals(studio.workspace):
            data = evals.results(folder)
            found.append(
                {
                    "id": folder.relative_to(studio.workspace).as_posix(),
                    "data": data,
                    "failed": (data.get("run") or {}).get("gate_failed"),
                }
            )
        return page(request, "evals.html", evals=found)

    def eval_folder(eid: str) -> Path:
        folder = evals.resolve_eval(studio.workspace, eid)
        if folder is None:
            raise HTTPException(404, f"no eval results '{eid}' in {studio.workspace}")
        return folder

    @app.get("/evals/{eid:path}/grade", response_class=HTMLResponse)
    async def grade_page(request: Request, eid: str, a: str = "", b: str = "", grader: str = ""):
        folder = eval_folder(eid)
        data = evals.results(folder)
        candidates = data.get("candidates", [])
        a = a if a in candidates else (data.get("baseline") or (candidates[:1] or [""])[0])
        b = b if b in candidates and b != a else next((c for c in candidates if c != a), "")
        rows, item, shown, done = evals.examples(folder, data), None, [], 0
        if grader.strip():
            grades = grading.read_grades(folder)
            done = sum(g["grader"] == grader.strip() and set(g["candidates"]) == {a, b} for g in grades)
            item = grading.next_example(rows, grades, a, b, grader.strip())
            if item is not None:
                shown = [
                    item["outputs"][name]["output"]
                    for name in grading.order(folder, item["index"], a, b, grader.strip())
                ]
        return page(
            request,
            "grade.html",
            eid=eid,
            candidates=candidates,
            a=a,
            b=b,
            grader=grader.strip(),
            item=item,
            answers=shown,
            done=done,
            total=len(rows),
            criteria=grading.CRITERIA,
        )

    @app.post("/api/evals/{eid:path}/grades")
    async def save_grade(request: Request, eid: str):
        folder = eval_folder(eid)
        body = await request.json()
        rows = evals.examples(folder, evals.results(folder))
        try:
            index = int(body.get("index"))
        except (TypeError, ValueError):
            raise ConfigError("index must be the example number") from None
        grade = grading.record(
            folder,
            rows,
            index=index,
            a=str(body.get("a", "")),
            b=str(body.get("b", "")),
            grader=str(body.get("grader", "")),
            preferred=str(body.get("preferred", "")),
            scores=body.get("scores") or {},
        )
        return {"saved": {k: grade[k] for k in ("index", "grader")}}

    @app.get("/evals/{eid:path}/preferences.jsonl")
    async def preference_data(eid: str):
        folder = eval_folder(eid)
        rows = evals.examples(folder, evals.results(folder))
        lines = [
            json.dumps(p, ensure_ascii=False) for p in grading.preferences(grading.read_grades(folder), rows)
        ]
        return PlainTextResponse(
            "".join(line + "\n" for line in lines),
            media_type="application/jsonl",
            headers={"Content-Disposition": 'attachment; filename="preferences.jsonl"'},
        )

    @app.get("/evals/{eid:path}", response_class=HTMLResponse)
    async def eval_page(
        request: Request, eid: str, candidate: str = "", metric: str = "", lost: bool = False, offset: int = 0
    ):
        folder = eval_folder(eid)
        data = evals.results(folder)
        rows = evals.examples(folder, data)
        candidates, baseline = data.get("candidates", []), data.get("baseline")
        per_example = sorted({m for r in rows for o in r["outputs"].values() for m in o["scores"]})
        metric = metric if metric in per_example else (per_example[0] if per_example else "")
        candidate = (
            candidate if candidate in candidates else next((c for c in candidates if c != baseline), "")
        )
        shown = rows
        if lost and candidate and baseline and metric:
            higher = (data.get("higher_is_better") or {}).get(metric, True)
            shown = evals.lost_to_baseline(rows, candidate, baseline, metric, higher)
        offset = max(0, offset)
        return page(
            request,
            "eval.html",
            eid=eid,
            data=data,
            table=evals.table_rows(data),
            candidates=candidates,
            baseline=baseline,
            per_example=per_example,
            metric=metric,
            candidate=candidate,
            lost=lost,
            total=len(rows),
            matched=len(shown),
            offset=offset,
            examples=shown[offset : offset + 25],
            human=grading.summary(grading.read_grades(folder)),
            criteria=grading.CRITERIA,
        )
