//! The README's "Try it" and "Clients" examples, run as written against
//! `infergate serve` with its embedded default config (what `make run`
//! starts). Only the addresses change: the test's gateway listens on
//! ephemeral ports.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::Command;
use std::time::Duration;

use infergate_e2e::{Gateway, root};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// One example: its command (the indented block) and what the README says
/// it prints (the first `code` after "prints", if the next paragraph has one).
struct Example {
    command: String,
    prints: Option<String>,
}

/// The indented blocks of the README section headed `heading`.
fn examples(heading: &str) -> Vec<Example> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let (_, section) = readme.split_once(&format!("\n## {heading}\n")).unwrap_or_else(|| panic!("no {heading}"));
    let section = section.split_once("\n## ").map_or(section, |(it, _)| it);
    let mut out: Vec<Example> = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    for line in section.lines() {
        if let Some(code) = line.strip_prefix("    ") {
            block.push(code);
        } else if !line.trim().is_empty() && !block.is_empty() {
            // The line right after a block says what it prints.
            let prints = line.strip_prefix("prints `").and_then(|rest| rest.split('`').next()).map(str::to_owned);
            out.push(Example { command: block.join("\n"), prints });
            block.clear();
        }
    }
    assert!(block.is_empty(), "the section ends in a block without a word on what it prints");
    out
}

/// Run `command` with bash from the workspace root, aimed at `gw`.
fn run(gw: &Gateway, command: &str) -> String {
    let admin = gw.admin.map(|a| a.to_string()).unwrap_or_default();
    let command = command
        .replace("127.0.0.1:8080", &gw.http.to_string())
        .replace("127.0.0.1:50051", &gw.grpc.to_string())
        .replace("127.0.0.1:8081", &admin);
    let out = Command::new("bash").args(["-euo", "pipefail", "-c", &command]).current_dir(root()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command}\nfailed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn the_try_it_examples_work_as_written_against_the_default_config() {
    let examples = examples("Try it");
    let gw = Gateway::start_default(Duration::from_secs(180)).unwrap();
    let find = |needle: &str| {
        examples.iter().find(|e| e.command.contains(needle)).unwrap_or_else(|| panic!("no example with {needle}"))
    };

    // Those whose exact output the README gives.
    let exact =
        ["/v1/embeddings", "\"shape\": [2, 2]", "/v2/models/sentiment/infer", "pb.EmbedRequest", "/console/api/status"];
    for needle in exact {
        let example = find(needle);
        let said = example.prints.as_deref().unwrap_or_else(|| panic!("no `prints` after {}", example.command));
        assert_eq!(run(&gw, &example.command).trim(), said, "{}", example.command);
    }

    let headers = run(&gw, &find("grep -i '^x-'").command);
    for name in ["x-cache: miss", "x-infergate-queue-time: ", "x-infergate-inference-time: ", "x-request-id: "] {
        assert!(headers.contains(name), "no {name} in:\n{headers}");
    }

    let chat = run(&gw, &find("/v1/chat/completions").command);
    assert!(chat.contains("\"delta\":{\"content\":\" flow\"}"), "{chat}");
    assert!(chat.contains("\"finish_reason\":\"stop\""), "{chat}");
    assert!(chat.trim_end().ends_with("data: [DONE]"), "{chat}");

    let rag = run(&gw, &find("model=\"rag\"").command);
    assert!(rag.starts_with("Extractive answer (no language model is configured)"), "{rag}");
    assert!(rag.contains("[docs/") || rag.contains("[README.md"), "no source in:\n{rag}");

    let deadline = run(&gw, &find("x-request-timeout: 300ms").command);
    assert!(deadline.starts_with("HTTP/1.1 504"), "{deadline}");

    // Every example of the section is one of the above.
    assert_eq!(examples.len(), exact.len() + 4, "an example without a check: {:#?}", commands(&examples));

    // "Clients", against the same gateway: each Python block prints what
    // the text block after it says.
    let clients = client_examples("Clients");
    assert!(clients.len() >= 4, "{clients:#?}");
    let streams = client_examples("Streams of frames: video over gRPC and WebSocket");
    assert_eq!(streams.len(), 1, "{streams:#?}");
    for (code, prints) in clients.into_iter().chain(streams) {
        let code =
            code.replace("127.0.0.1:8080", &gw.http.to_string()).replace("127.0.0.1:50051", &gw.grpc.to_string());
        let out = Command::new(infergate_e2e::python()).args(["-c", &code]).current_dir(root()).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{code}\nfailed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.trim(), prints.trim(), "{code}");
    }
}

/// The examples of the section headed `heading`: each fenced `python`
/// block and the fenced `text` block after it (what it prints); other
/// languages' blocks (a browser's JavaScript) are not run.
fn client_examples(heading: &str) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let (_, section) =
        readme.split_once(&format!("\n## {heading}\n")).unwrap_or_else(|| panic!("no section {heading}"));
    let section = section.split_once("\n## ").map_or(section, |(it, _)| it);
    let blocks: Vec<(&str, &str)> = section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|b| b.split_once('\n').unwrap_or((b, "")))
        .filter(|(lang, _)| *lang != "js")
        .collect();
    let mut out = Vec::new();
    for pair in blocks.chunks(2) {
        match pair {
            [("python", code), ("text", prints)] => out.push(((*code).to_owned(), (*prints).to_owned())),
            other => panic!("a python block must be followed by a text block of what it prints: {other:?}"),
        }
    }
    out
}

fn commands(examples: &[Example]) -> Vec<&str> {
    examples.iter().map(|e| e.command.as_str()).collect()
}

/// The fenced `lang` block of the README that contains `needle`.
fn fenced(lang: &str, needle: &str) -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    readme
        .split(&format!("```{lang}\n"))
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```").map(|(block, _)| block))
        .find(|block| block.contains(needle))
        .unwrap_or_else(|| panic!("no {lang} block with {needle}"))
        .to_owned()
}

/// The fenced `sh` block of the README that contains `needle`.
fn sh_block(needle: &str) -> String {
    fenced("sh", needle)
}

/// Run `script` with bash in `dir`, the gateway it starts listening on
/// `port`: its exit status, stdout and stderr. It runs in a process group
/// of its own (`timeout` makes one), stopped afterwards with whatever it
/// left running, and the port is free again before this returns.
fn run_script(script: &str, dir: &std::path::Path, port: u16, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut child = Command::new("timeout")
        .args(["180", "bash", "-c", &format!("set -euo pipefail\n{script}")])
        .env("INFERGATE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("INFERGATE__GRPC__LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .current_dir(dir)
        // Files, not pipes: the gateway it starts in the background holds them.
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let group = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let status = child.wait().unwrap();
    let _ = killpg(group, Signal::SIGTERM);
    // `kill %1` asked its gateway to stop: it must let go of the port.
    let gone = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(gone.elapsed() < Duration::from_secs(30), "the script's gateway did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    (status.success(), read("stdout"), read("stderr"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn the_auth_worked_example_answers_401_then_200s_then_429_with_ratelimit_headers() {
    let _serial = infergate_e2e::one_at_a_time();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("infergate-auth-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // As written, but with the binary under test, a free port, and run in a
    // scratch folder (it writes its key and config files where it runs).
    let script = sh_block("infergate keys new")
        .replace("./target/release/infergate", &infergate_e2e::gateway_bin().display().to_string())
        .replace("localhost:8080", &format!("127.0.0.1:{port}"));
    let python = infergate_e2e::python().display().to_string();
    let (ok, stdout, stderr) = run_script(&script, &dir, port, &[("INFERGATE__WORKERS__PYTHON", &python)]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{script}\nfailed: {stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.get(..5), Some(&["401", "200", "200", "200", "429"][..]), "{stdout}");
    assert!(lines.len() > 5 && lines[5..].iter().all(|l| l.to_lowercase().starts_with("ratelimit")), "{stdout}");
}

/// "Changing a running gateway": an alias and workers added by a reload, a
/// broken file refused, the admin API closed without a key; as written,
/// with the binary under test and free ports.
#[test]
fn the_reload_worked_example_adds_an_alias_and_workers_and_refuses_a_broken_file() {
    let _serial = infergate_e2e::one_at_a_time();
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("infergate-reload-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = sh_block("/admin/reload")
        .replace("./target/release/infergate", &infergate_e2e::gateway_bin().display().to_string())
        .replace("localhost:8080", &format!("127.0.0.1:{port}"))
        .replace("localhost:8081", &format!("127.0.0.1:{admin}"));
    let python = infergate_e2e::python().display().to_string();
    let env =
        [("INFERGATE__WORKERS__PYTHON", python.as_str()), ("INFERGATE__ADMIN__LISTEN", &format!("127.0.0.1:{admin}"))];
    let (ok, stdout, stderr) = run_script(&script, &dir, port, &env);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{script}\nfailed: {stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["200", "\"content\":\"hello\"", "\"type\":\"urn:infergate:error:config-refused\"", "401"],
        "{stdout}"
    );
}

/// "Serving your own model": the class saved in a folder of the user's
/// own, checked, given a pool, served and called, as written. Only the
/// checkout's path, the binary (the one under test) and the port change;
/// the workers' Python is found as the README says, not set.
#[test]
fn the_model_author_walkthrough_works_as_written_from_a_folder_of_ones_own() {
    let _serial = infergate_e2e::one_at_a_time();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("infergate-author-walk-{:x}", infergate_e2e::rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mymodels.py"), fenced("python", "# mymodels.py\n")).unwrap();
    let script = sh_block("check-config --config my.toml")
        .replace("INFERGATE=/path/to/infergate", &format!("INFERGATE={}", root().display()))
        .replace("$INFERGATE/target/release/infergate", &infergate_e2e::gateway_bin().display().to_string())
        .replace("localhost:8080", &format!("127.0.0.1:{port}"));
    let (ok, stdout, stderr) = run_script(&script, &dir, port, &[]);
    let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{script}\nfailed: {stdout}\n{stderr}\n{log}");
    let said = fenced("text", "config ok");
    assert_eq!(stdout.trim(), said.trim(), "{stderr}\n{log}");
}

/// "Queued work": a Redis of its own, an async request answered later and
/// a batch through the openai package's Batch API, as written.
#[test]
fn the_queue_worked_example_answers_later_and_runs_a_batch() {
    let _serial = infergate_e2e::one_at_a_time();
    let (port, redis) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("infergate-queue-demo-{:x}", infergate_e2e::rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let local = |text: &str| {
        text.replace("./target/release/infergate", &infergate_e2e::gateway_bin().display().to_string())
            .replace(".venv/bin/python", &infergate_e2e::python().display().to_string())
            .replace("localhost:8080", &format!("127.0.0.1:{port}"))
            .replace("6390", &redis.to_string())
    };
    std::fs::write(dir.join("batch.py"), local(&fenced("python", "# batch.py"))).unwrap();
    let script = local(&sh_block("Prefer: respond-async"));
    let python = infergate_e2e::python().display().to_string();
    let env = [("INFERGATE__WORKERS__PYTHON", python.as_str()), ("INFERGATE__ADMIN__LISTEN", "127.0.0.1:0")];
    let (ok, stdout, stderr) = run_script(&script, &dir, port, &env);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{script}\nfailed: {stdout}\n{stderr}");
    let said = fenced("text", "completed 3/3");
    assert_eq!(stdout.trim(), said.trim(), "{stderr}");
}
