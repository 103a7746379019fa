//! What differs between the config in force and a new one: what needs a
//! restart, and what happens to each pool.

use std::collections::BTreeMap;

use crate::config::raw::RawPool;
use crate::config::{Config, PoolConfig, PoolKind};

/// Keys a running gateway cannot change: its listeners, its workers'
/// process settings, its Redis and the sections read once at start. A
/// prefix names every key below it.
const RESTART_ONLY: &[&str] = &[
    "http",
    "grpc",
    "admin.listen",
    "admin.watch_config",
    "workers",
    "redis",
    "responses",
    "queue",
    "tracing",
    "discovery",
    "deadlines",
    "shutdown",
    "log.format",
];

/// The keys, as a path (`http.listen`, `pools[2].kind`), whose values
/// differ between `a` and `b`.
fn differing(path: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
    match (a, b) {
        (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                differing(&sub, a.get(k), b.get(k), out);
            }
        }
        (a, b) if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

fn value<T: serde::Serialize>(raw: &T) -> Option<toml::Value> {
    toml::Value::try_from(raw).ok()
}

/// Every key of `new` that needs a restart and differs from `old`.
pub fn restart_only(old: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    differing("", value(&old.raw).as_ref(), value(&new.raw).as_ref(), &mut keys);
    let mut refused: Vec<String> =
        keys.into_iter().filter(|k| RESTART_ONLY.iter().any(|r| k == r || k.starts_with(&format!("{r}.")))).collect();
    // Embedded pools run in the gateway's own interpreter, imported at start.
    let embedded =
        |c: &Config, name: &str| c.pools.iter().any(|p| p.name == name && matches!(p.kind, PoolKind::Embedded { .. }));
    let (before, after) = (by_name(&old.raw.pools), by_name(&new.raw.pools));
    for (i, p) in new.raw.pools.iter().enumerate() {
        let changed = before.get(p.name.as_str()).is_none_or(|o| value(o) != value(p));
        if changed && (embedded(new, &p.name) || embedded(old, &p.name)) {
            refused.push(format!("pools[{i}] (embedded pool {:?})", p.name));
        }
    }
    for p in old.raw.pools.iter().filter(|p| !after.contains_key(p.name.as_str()) && embedded(old, &p.name)) {
        refused.push(format!("pools (embedded pool {:?} removed)", p.name));
    }
    // A pool that changes kind, or the name it is discovered by.
    for (i, p) in new.pools.iter().enumerate() {
        let Some(o) = old.pools.iter().find(|o| o.name == p.name) else { continue };
        match (&o.kind, &p.kind) {
            (PoolKind::Local { .. }, PoolKind::Local { .. })
            | (PoolKind::Remote { .. }, PoolKind::Remote { .. })
            | (PoolKind::Embedded { .. }, PoolKind::Embedded { .. }) => {}
            (PoolKind::Discovered { host: h1, port: p1, every: e1 }, PoolKind::Discovered { host, port, every })
                if (h1, p1, e1) == (host, port, every) => {}
            (PoolKind::Discovered { .. }, PoolKind::Discovered { .. }) => {
                refused.push(format!("pools[{i}].discover"));
            }
            _ => refused.push(format!("pools[{i}] (its kind: local, remote, discovered)")),
        }
    }
    refused
}

fn by_name(pools: &[RawPool]) -> BTreeMap<&str, &RawPool> {
    pools.iter().map(|p| (p.name.as_str(), p)).collect()
}

/// The settings of a pool besides where its workers come from.
fn tuning(p: &RawPool) -> Option<toml::Value> {
    let mut t = p.clone();
    t.class.clear();
    t.kind = None;
    t.workers = None;
    t.threads = None;
    t.env.clear();
    t.addresses.clear();
    t.discover = None;
    // Read by the cache, which is rebuilt when it changes.
    t.deterministic = None;
    value(&t)
}

/// What a reload does to the pools, by pool name.
#[derive(Debug, Default)]
pub struct Plan {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Bounds, circuit, outlier, retries or batching changed.
    pub retuned: Vec<String>,
    /// A remote pool whose addresses changed.
    pub members: Vec<String>,
    /// A local pool whose worker count, class, threads or env changed.
    pub local: Vec<String>,
    /// Local pools whose workers are rolled (class, threads or env).
    pub rolled: Vec<String>,
    /// Lines for the log and the admin answer.
    lines: Vec<String>,
}

impl Plan {
    /// The pools whose classes must be checked before the change: local
    /// pools added, and those whose workers run something new.
    pub fn checked<'a>(&self, new: &'a Config) -> Vec<&'a PoolConfig> {
        new.pools
            .iter()
            .filter(|p| matches!(p.kind, PoolKind::Local { .. }))
            .filter(|p| self.added.contains(&p.name) || self.rolled.contains(&p.name))
            .collect()
    }

    pub fn describe(&self) -> Vec<String> {
        self.lines.clone()
    }
}

/// Local pool fields that make a worker run something else.
fn code(kind: &PoolKind) -> Option<(&str, u32, &BTreeMap<String, String>)> {
    match kind {
        PoolKind::Local { class, threads, env, .. } => Some((class, threads.get(), env)),
        _ => None,
    }
}

fn workers(kind: &PoolKind) -> Option<u32> {
    match kind {
        PoolKind::Local { workers, .. } => Some(workers.get()),
        _ => None,
    }
}

/// What happens to each pool going from `old` to `new`.
pub fn pools(old: &Config, new: &Config) -> Plan {
    let mut plan = Plan::default();
    let (raw_old, raw_new) = (by_name(&old.raw.pools), by_name(&new.raw.pools));
    for p in &new.pools {
        let Some(o) = old.pools.iter().find(|o| o.name == p.name) else {
            plan.lines.push(format!("pool {} added", p.name));
            plan.added.push(p.name.clone());
            continue;
        };
        if raw_old.get(p.name.as_str()).and_then(|r| tuning(r)) != raw_new.get(p.name.as_str()).and_then(|r| tuning(r))
        {
            plan.lines.push(format!("pool {}: settings changed", p.name));
            plan.retuned.push(p.name.clone());
        }
        if let (PoolKind::Remote { addresses: a }, PoolKind::Remote { addresses: b }) = (&o.kind, &p.kind)
            && a != b
        {
            plan.lines.push(format!("pool {}: addresses {} -> {}", p.name, a.len(), b.len()));
            plan.members.push(p.name.clone());
        }
        let rolled = code(&o.kind) != code(&p.kind);
        let resized = workers(&o.kind) != workers(&p.kind);
        if rolled {
            plan.lines.push(format!("pool {}: workers rolled to the new class, threads or env", p.name));
            plan.rolled.push(p.name.clone());
        }
        if resized {
            let (a, b) = (workers(&o.kind).unwrap_or(0), workers(&p.kind).unwrap_or(0));
            plan.lines.push(format!("pool {}: workers {a} -> {b}", p.name));
        }
        if rolled || resized {
            plan.local.push(p.name.clone());
        }
    }
    for o in old.pools.iter().filter(|o| new.pools.iter().all(|p| p.name != o.name)) {
        plan.lines.push(format!("pool {} removed", o.name));
        plan.removed.push(o.name.clone());
    }
    plan
}

/// Sections a reload changes in place (routes, limits, auth, cache,
/// prices, the log level, admin credentials), as lines for the log.
pub fn sections(old: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    differing("", value(&old.raw).as_ref(), value(&new.raw).as_ref(), &mut keys);
    let mut out: Vec<String> = Vec::new();
    for key in keys.iter().filter(|k| !k.starts_with("pools")) {
        let section = match key.split_once('.') {
            Some(("log" | "admin", _)) => key.clone(),
            Some((s, _)) => s.to_owned(),
            None => key.clone(),
        };
        let line = format!("{section} changed");
        if !out.contains(&line) {
            out.push(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[[pools]]\nname = \"echo\"\nclass = \"m:Echo\"\nworkers = 1\n\
             [[pools]]\nname = \"far\"\naddresses = [\"http://127.0.0.1:9\"]\n{extra}"
        );
        let raw: crate::config::RawConfig = toml::from_str(&text).unwrap();
        Config::from_raw(raw).unwrap()
    }

    #[test]
    fn listeners_and_worker_settings_need_a_restart_and_are_named() {
        let old = config("");
        let new = config("[http]\nlisten = \"127.0.0.1:9999\"\n[workers]\nsocket_dir = \"/tmp/x\"\n");
        assert_eq!(restart_only(&old, &new), ["http.listen", "workers.socket_dir"]);
        let new = config("[admin]\nlisten = \"127.0.0.1:9998\"\n");
        assert_eq!(restart_only(&old, &new), ["admin.listen"]);
        // What a reload applies is not refused.
        let new = config("[limits.global]\nrate = 5\n[log]\nlevel = \"debug\"\n[admin]\nkeys = [\"ops\"]\n");
        assert!(restart_only(&old, &new).is_empty(), "{:?}", restart_only(&old, &new));
    }

    #[test]
    fn each_pool_change_is_planned() {
        let old = config("");
        let mut text = toml::to_string(&old.raw).unwrap();
        text = text.replace("workers = 1", "workers = 3\nmax_queue = 5");
        text = text.replace("http://127.0.0.1:9", "http://127.0.0.1:10");
        text += "[[pools]]\nname = \"new\"\nclass = \"m:New\"\n";
        let new = Config::from_raw(toml::from_str(&text).unwrap()).unwrap();
        let plan = pools(&old, &new);
        assert_eq!(plan.added, ["new"]);
        assert_eq!(plan.retuned, ["echo"]);
        assert_eq!(plan.local, ["echo"]);
        assert!(plan.rolled.is_empty());
        assert_eq!(plan.members, ["far"]);
        assert_eq!(plan.checked(&new).iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["new"]);
        let rolled = Config::from_raw(toml::from_str(&text.replace("m:Echo", "m:Echo2")).unwrap()).unwrap();
        let plan = pools(&old, &rolled);
        assert_eq!(plan.rolled, ["echo"]);
        let gone = config("").raw.pools.into_iter().take(1).collect::<Vec<_>>();
        let mut raw = old.raw.clone();
        raw.pools = gone;
        let plan = pools(&old, &Config::from_raw(raw).unwrap());
        assert_eq!(plan.removed, ["far"]);
    }
}
