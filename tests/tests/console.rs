//! The console in a real browser: Debian's Chromium, headless, driven by
//! Playwright for Python (`tests/console/console_check.py`), against the
//! real gateway and its real workers.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use infergate_e2e::{ECHO_POOL, Gateway, python, root};

/// Run the browser check `args`; it prints `ok` when every check held.
fn browser_check(args: &[&str]) {
    let out = Command::new(python())
        .arg(root().join("tests/console/console_check.py"))
        .args(args)
        .output()
        .expect("run the console check");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stderr}");
    assert!(out.status.success() && stdout.trim() == "ok", "console check {args:?} failed:\n{stdout}\n{stderr}");
}

/// Where the screenshots go: `INFERGATE_SCREENSHOTS` (`make screenshots`
/// points it at docs/img), else the target directory.
fn screenshots() -> String {
    std::env::var("INFERGATE_SCREENSHOTS")
        .unwrap_or_else(|_| root().join("target/console-screenshots").display().to_string())
}

#[test]
fn the_console_shows_pools_and_workers_live_and_its_playground_calls_every_kind_of_model() {
    // `make run`'s gateway: the embedded default with every example model.
    let gw = Gateway::start_default(Duration::from_secs(180)).unwrap();
    let shots = screenshots();
    browser_check(&["open", &gw.admin_url(""), &shots]);
    for view in ["status", "chat", "embeddings", "tensors", "phone"] {
        let shot = Path::new(&shots).join(format!("console-{view}.png"));
        assert!(shot.metadata().is_ok_and(|m| m.len() > 10_000), "no screenshot {}", shot.display());
    }
}

const ADMIN_KEY: &str = "ig_console-admin-key-aaaaaaaaaaaaaaaaaaaaaaa";
const VIEWER_KEY: &str = "ig_console-viewer-key-bbbbbbbbbbbbbbbbbbbbbbb";
const CLIENT_KEY: &str = "ig_console-client-key-ccccccccccccccccccccccc";

fn digest(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

#[test]
fn with_auth_on_the_console_asks_for_a_key_refuses_wrong_ones_and_shows_viewers_status_only() {
    let keys: String = [("ops", ADMIN_KEY), ("watch", VIEWER_KEY), ("app", CLIENT_KEY)]
        .iter()
        .map(|(id, key)| format!("[[auth.keys]]\nid = \"{id}\"\nsha256 = \"{}\"\ntenant = \"t1\"\n", digest(key)))
        .collect();
    // An alias with a canary, for the status view's weights and the playground's variant header.
    let alias = "[[aliases]]\nname = \"talk\"\n\
                 [[aliases.variants]]\nname = \"stable\"\npool = \"echo\"\nmodel = \"echo\"\nweight = 80\n\
                 [[aliases.variants]]\nname = \"canary\"\npool = \"echo\"\nmodel = \"echo\"\nweight = 20\n";
    let config = format!(
        "[auth]\nenabled = true\n{keys}\n[admin]\nkeys = [\"ops\"]\nviewer_keys = [\"watch\"]\n{ECHO_POOL}{alias}"
    );
    let gw = Gateway::start(&config).unwrap();
    browser_check(&["auth", &gw.admin_url(""), ADMIN_KEY, VIEWER_KEY, CLIENT_KEY]);
}
