// The restore page and the maintenance page.
//
// Restore page: the Restore button enables only when the field holds exactly "restore" (and a
// bundle is chosen, and an unsigned backup's second confirmation is ticked). Submitting first
// asks the server to check every gate without a body; then the bundle goes up as the raw request
// body (XHR, for its upload progress and Cancel), with the CSRF token in X-CSRFToken, the typed
// word in ?confirmation= and X-Confirm-Restore: yes. Once queued, the page follows the restore;
// when maintenance mode begins it reloads into the maintenance page, which follows it to the end
// and then goes to the sign-in page (via restore/done, which leaves the message there).
"use strict";

(function () {
    const WORD = "restore";
    const POLL_MS = 500;

    function showMessage(level, text) {
        let list = document.querySelector("ul.messagelist");
        if (!list) {
            list = document.createElement("ul");
            list.className = "messagelist";
            document.getElementById("content").before(list);
        }
        const item = document.createElement("li");
        item.className = level;
        item.textContent = text;
        list.replaceChildren(item);
        item.setAttribute("role", level === "error" ? "alert" : "status");
    }

    function megabytes(bytes) {
        return (bytes / 1e6).toLocaleString(undefined, {maximumFractionDigits: 1}) + " MB";
    }

    async function problemText(response) {
        const body = await response.json().catch(() => ({}));
        return body.detail || `The restore was refused (HTTP ${response.status}). Nothing was changed.`;
    }

    // Following a queued restore, on either page ---------------------------------------------

    function follower(onState) {
        let stopped = false;
        return {
            start(url) {
                const tick = async () => {
                    if (stopped) {
                        return;
                    }
                    let response;
                    try {
                        response = await fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin"});
                    } catch (error) {
                        window.setTimeout(tick, POLL_MS * 4); // the server restarting: try again
                        return;
                    }
                    if (!response.ok) {
                        onState(null, response.status);
                        return;
                    }
                    const state = await response.json();
                    if (onState(state, response.status) !== false) {
                        window.setTimeout(tick, POLL_MS);
                    }
                };
                tick();
            },
            stop() {
                stopped = true;
            },
        };
    }

    function describe(state) {
        if (state.state === "queued") {
            return "queued, waiting for a worker";
        }
        const percent = state.percent === null || state.percent === undefined ? "" : ` · ${state.percent}%`;
        return `${state.step}${percent}`;
    }

    function finished(state) {
        return state.state === "succeeded" || state.state === "failed";
    }

    // The restore page ---------------------------------------------------------------------------

    function restorePage(form) {
        const field = form.querySelector("#restore-confirmation");
        const button = form.querySelector("#restore-submit");
        const file = form.querySelector("#restore-file");
        const trust = form.querySelector("#restore-trust");
        const progress = document.getElementById("restore-progress");
        const live = document.getElementById("restore-live");
        const uploadPanel = document.getElementById("upload-panel");
        const uploadBar = document.getElementById("upload-bar");
        const uploadText = document.getElementById("upload-text");
        const cancel = document.getElementById("upload-cancel");
        const restorePanel = document.getElementById("restore-panel");
        const restoreBar = document.getElementById("restore-bar");
        const restoreText = document.getElementById("restore-text");
        const steps = document.getElementById("restore-steps");
        const token = form.querySelector("input[name=csrfmiddlewaretoken]").value;
        const keyFile = form.querySelector("#restore-key");
        const passphrase = form.querySelector("#restore-passphrase");
        let keysToken = "";
        let busy = false;

        function ready() {
            return (
                !busy &&
                field.value === WORD &&
                (!file || file.files.length === 1) &&
                (!form.hasAttribute("data-trust-required") || trust.checked)
            );
        }

        function update() {
            const enabled = ready();
            button.disabled = !enabled;
            button.setAttribute("aria-disabled", String(!enabled));
        }

        function setBusy(value) {
            busy = value;
            form.querySelectorAll("input, button").forEach((element) => {
                if (element !== button && element.type !== "hidden") {
                    element.disabled = value;
                }
            });
            update();
        }

        function say(text) {
            live.textContent = text;
        }

        function refused(text, level = "error") {
            showMessage(level, text);
            say(text);
            uploadPanel.hidden = true;
            restorePanel.hidden = true;
            progress.hidden = true;
            setBusy(false);
        }

        function showRestore(state) {
            progress.hidden = false;
            restorePanel.hidden = false;
            if (state.percent === null || state.percent === undefined) {
                restoreBar.removeAttribute("value");
            } else {
                restoreBar.value = state.percent;
            }
            const text = describe(state);
            if (restoreText.textContent !== text) {
                restoreText.textContent = text;
                say(`Restore: ${text}`);
            }
            steps.replaceChildren(
                ...state.steps.map((line) => {
                    const item = document.createElement("li");
                    item.textContent = line;
                    return item;
                }),
            );
        }

        function follow(statusUrl) {
            follower((state, status) => {
                if (state === null) {
                    if (status !== 404) {
                        refused(`The restore's progress cannot be read (HTTP ${status}); reload the page.`);
                    }
                    return false;
                }
                showRestore(state);
                if (finished(state)) {
                    window.location.assign(state.done_url);
                    return false;
                }
                if (state.maintenance) {
                    // The portal is in maintenance now: the maintenance page takes over.
                    window.location.reload();
                    return false;
                }
                return true;
            }).start(statusUrl);
        }

        function queued(job) {
            uploadPanel.hidden = true;
            showRestore(job);
            follow(job.status_url);
        }

        function headers() {
            const sent = {"X-CSRFToken": token, "X-Confirm-Restore": "yes", Accept: "application/json"};
            if (keysToken) {
                sent["X-Restore-Keys"] = keysToken;
            }
            return sent;
        }

        // A private key or a passphrase for an encrypted backup, held on the server for this
        // restore only; the requests that follow name it by its token. False when refused.
        async function holdKeys() {
            keysToken = "";
            const key = keyFile && keyFile.files.length === 1 ? await keyFile.files[0].text() : "";
            const secret = passphrase ? passphrase.value : "";
            if (!key && !secret) {
                return true;
            }
            const response = await fetch(keyFile.dataset.keysUrl, {
                method: "POST",
                headers: {"X-CSRFToken": token, "Content-Type": "application/json", Accept: "application/json"},
                credentials: "same-origin",
                body: JSON.stringify(key ? {secret_key: key, key_passphrase: secret} : {passphrase: secret}),
            });
            if (response.status !== 201) {
                refused(await problemText(response));
                return false;
            }
            keysToken = (await response.json()).token;
            return true;
        }

        function query() {
            const params = new URLSearchParams({confirmation: field.value});
            if (trust && trust.checked) {
                params.set("trust_unsigned", "yes");
            }
            if (file) {
                params.set("filename", file.files[0].name);
            }
            return params;
        }

        function upload(chosen, params) {
            const xhr = new XMLHttpRequest();
            xhr.open("POST", `${form.action}?${params}`);
            for (const [name, value] of Object.entries(headers())) {
                xhr.setRequestHeader(name, value);
            }
            xhr.setRequestHeader("Content-Type", "application/octet-stream");
            const started = performance.now();
            let lastSaid = 0;
            progress.hidden = false;
            uploadPanel.hidden = false;
            cancel.hidden = false;
            cancel.disabled = false;
            uploadBar.value = 0;
            uploadText.textContent = `0 of ${megabytes(chosen.size)}`;
            xhr.upload.onprogress = (event) => {
                const total = event.lengthComputable ? event.total : chosen.size;
                const percent = Math.floor((event.loaded * 100) / Math.max(total, 1));
                const seconds = (performance.now() - started) / 1000;
                const speed = seconds > 0 ? event.loaded / seconds : 0;
                uploadBar.value = percent;
                uploadText.textContent = `${megabytes(event.loaded)} of ${megabytes(total)} · ${percent}% · ${megabytes(speed)}/s`;
                if (performance.now() - lastSaid > 5000) {
                    lastSaid = performance.now();
                    say(`Upload ${percent}%`);
                }
            };
            xhr.upload.onload = () => {
                uploadBar.value = 100;
                cancel.hidden = true;
                uploadText.textContent = `${megabytes(chosen.size)} uploaded · checking the bundle…`;
                say("Upload complete; the server is checking the bundle.");
            };
            xhr.onload = () => {
                if (xhr.status === 202) {
                    queued(JSON.parse(xhr.responseText));
                    return;
                }
                let detail = "";
                try {
                    detail = JSON.parse(xhr.responseText).detail;
                } catch (error) {
                    detail = "";
                }
                refused(detail || `The upload was refused (HTTP ${xhr.status}). Nothing was changed.`);
            };
            xhr.onerror = () => refused("The upload broke off (the connection was lost). Nothing was changed.");
            xhr.onabort = () => refused("Upload cancelled. Nothing was changed.", "warning");
            cancel.onclick = () => xhr.abort();
            xhr.send(chosen);
        }

        async function submit(event) {
            event.preventDefault();
            if (!ready()) {
                return;
            }
            const params = query();
            setBusy(true);
            try {
                if (!(await holdKeys())) {
                    return;
                }
                if (file) {
                    const chosen = file.files[0];
                    // Every gate first, without the body: a refusal then costs no upload.
                    const check = new URLSearchParams(params);
                    check.set("check", "yes");
                    check.set("size", String(chosen.size));
                    const response = await fetch(`${form.action}?${check}`, {
                        method: "POST",
                        headers: headers(),
                        credentials: "same-origin",
                    });
                    if (response.status !== 204) {
                        refused(await problemText(response));
                        return;
                    }
                    upload(chosen, params);
                    return;
                }
                progress.hidden = false;
                restorePanel.hidden = false;
                restoreBar.removeAttribute("value");
                restoreText.textContent = "checking the backup…";
                say("Checking the backup before it is queued.");
                const response = await fetch(`${form.action}?${params}`, {
                    method: "POST",
                    headers: headers(),
                    credentials: "same-origin",
                });
                if (response.status !== 202) {
                    refused(await problemText(response));
                    return;
                }
                queued(await response.json());
            } catch (error) {
                refused(`The restore could not be sent: ${error.message}. Nothing was changed.`);
            }
        }

        field.addEventListener("input", update);
        if (file) {
            file.addEventListener("change", () => {
                const limit = Number(file.dataset.maxBytes);
                if (file.files.length === 1 && file.files[0].size > limit) {
                    showMessage(
                        "error",
                        `${file.files[0].name} is ${megabytes(file.files[0].size)}, more than the ${megabytes(limit)} ` +
                            "the admin accepts: restore it on the server with manage.py restore.",
                    );
                    file.value = "";
                }
                update();
            });
        }
        if (trust) {
            trust.addEventListener("change", update);
        }
        form.addEventListener("submit", submit);
        update();

        // A restore this browser started (the page was reloaded): follow it, or go to its outcome.
        follower((state) => {
            if (state && finished(state)) {
                window.location.assign(state.done_url);
            } else if (state) {
                setBusy(true);
                queued(state);
            }
            return false;
        }).start(form.dataset.statusUrl);
    }

    // The maintenance page -----------------------------------------------------------------------

    function maintenancePage(root) {
        const bar = root.querySelector("progress");
        const text = root.querySelector("[data-step]");
        const retry = Number(root.dataset.retry) * 1000;
        follower((state) => {
            if (state === null) {
                // Not this browser's restore: reload now and then, like the page without JavaScript.
                window.setTimeout(() => window.location.reload(), retry);
                return false;
            }
            if (finished(state)) {
                window.location.assign(state.done_url);
                return false;
            }
            if (state.percent === null || state.percent === undefined) {
                bar.removeAttribute("value");
            } else {
                bar.value = state.percent;
            }
            text.textContent = describe(state);
            return true;
        }).start(root.dataset.statusUrl);
    }

    document.addEventListener("DOMContentLoaded", () => {
        const form = document.getElementById("restore-form");
        if (form) {
            restorePage(form);
        }
        const maintenance = document.querySelector("[data-restore-follow]");
        if (maintenance) {
            maintenancePage(maintenance);
        }
    });
})();
