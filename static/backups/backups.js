// The Backup page: start a run without leaving the page, and follow queued and running backups
// until they finish. Without JavaScript the forms still work; only the live bar is lost.
"use strict";

(function () {
    const POLL_MS = 1000;

    function showMessage(level, text) {
        let list = document.querySelector("ul.messagelist");
        if (!list) {
            // Where the admin puts its messages: above the content, clear of the toolbar.
            list = document.createElement("ul");
            list.className = "messagelist";
            document.getElementById("content").before(list);
        }
        const item = document.createElement("li");
        item.className = level;
        item.textContent = text;
        list.replaceChildren(item);
    }

    function startRun(form) {
        form.addEventListener("submit", async (event) => {
            event.preventDefault();
            const button = form.querySelector("button");
            button.disabled = true;
            try {
                const response = await fetch(form.action, {
                    method: "POST",
                    body: new FormData(form),
                    headers: {Accept: "application/json"},
                    credentials: "same-origin",
                });
                if (response.ok) {
                    // The new row, with its bar, is drawn by the server like every other row.
                    window.location.reload();
                    return;
                }
                const problem = await response.json().catch(() => ({}));
                showMessage("error", problem.detail || `The backup could not be started (HTTP ${response.status}).`);
            } catch (error) {
                showMessage("error", `The backup could not be started: ${error.message}`);
            }
            button.disabled = false;
        });
    }

    function follow(row) {
        const bar = row.querySelector("progress");
        const label = row.querySelector(".backup-progress-label");
        const badge = row.querySelector(".backup-status");
        const timer = window.setInterval(async () => {
            let state;
            try {
                const response = await fetch(row.dataset.statusUrl, {headers: {Accept: "application/json"}});
                if (!response.ok) {
                    return;
                }
                state = await response.json();
            } catch (error) {
                return; // a missed poll is retried on the next tick
            }
            row.dataset.status = state.status;
            badge.textContent = state.status;
            badge.className = `backup-status backup-status-${state.status}`;
            if (bar) {
                bar.value = state.progress;
                label.textContent = `${state.status} · ${state.progress}%`;
            }
            if (state.status === "succeeded" || state.status === "failed") {
                window.clearInterval(timer);
                // Reload for the Download link or the failure reason, drawn by the server.
                window.location.reload();
            }
        }, POLL_MS);
    }

    // A copy to S3 runs after its backup has finished: its own bar, in the Location column.
    function followCopy(row) {
        const timer = window.setInterval(async () => {
            let state;
            try {
                const response = await fetch(row.dataset.statusUrl, {headers: {Accept: "application/json"}});
                if (!response.ok) {
                    return;
                }
                state = (await response.json()).offsite;
            } catch (error) {
                return;
            }
            const bar = row.querySelector(".backup-copy-progress");
            const label = row.querySelector(".backup-copy-label");
            if (bar && state.state === "copying") {
                bar.value = state.progress;
                label.textContent = `copying to S3 · ${state.progress}%`;
            }
            if (state.state !== row.dataset.offsite) {
                window.clearInterval(timer);
                window.location.reload();  // the server draws the new state, its reason, its actions
            }
        }, POLL_MS);
    }

    document.addEventListener("DOMContentLoaded", () => {
        document.querySelectorAll("form[data-backup-run]").forEach(startRun);
        document.querySelectorAll('tr[data-status="queued"], tr[data-status="running"]').forEach(follow);
        document.querySelectorAll('tr[data-status="succeeded"][data-offsite="pending"], tr[data-status="succeeded"][data-offsite="copying"]').forEach(followCopy);
    });
})();
