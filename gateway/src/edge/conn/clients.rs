//! Connections by client address: how many each has open (the per-client
//! cap) and when its next one may be served (GCRA pacing).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Open connections and connection pacing by client address.
#[derive(Default)]
pub(super) struct PerClient(Mutex<Clients>);

#[derive(Default)]
struct Clients {
    by_ip: HashMap<IpAddr, Client>,
    /// Takes since addresses with nothing open or due were last swept out.
    since_sweep: u32,
}

struct Client {
    open: usize,
    /// When the address's next connection is due at the sustained rate (the
    /// theoretical arrival time of GCRA); later than now while it is paced.
    due: Instant,
}

/// Sweep idle addresses out of [`Clients`] every this many takes.
const SWEEP_EVERY: u32 = 1024;

/// How fast one address may start connections.
#[derive(Clone, Copy)]
pub(super) struct Pace {
    every: Duration,
    /// How far ahead of the sustained rate a burst may run: a tenth of a
    /// second's worth of connections, at most 8 (a browser opens 6). Forty
    /// connections let in at once are also cut at once by their deadlines,
    /// and that burst of answers and closes is what others wait behind.
    burst: Duration,
}

impl Pace {
    pub(super) fn new(per_second: u32) -> Option<Self> {
        let every = Duration::from_secs(1).checked_div(per_second)?;
        Some(Self { every, burst: every * (per_second / 10).clamp(1, 8) })
    }
}

impl PerClient {
    /// A slot for one more connection from `ip`, and when it may be served;
    /// `None` when `ip` holds `max` already.
    pub(super) fn try_take(
        self: Arc<Self>,
        ip: IpAddr,
        max: usize,
        pace: Option<Pace>,
        now: Instant,
    ) -> Option<(ClientSlot, Instant)> {
        let mut clients = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.since_sweep += 1;
        if clients.since_sweep >= SWEEP_EVERY {
            clients.since_sweep = 0;
            clients.by_ip.retain(|_, c| c.open > 0 || c.due > now);
        }
        let client = clients.by_ip.entry(ip).or_insert(Client { open: 0, due: now });
        if client.open >= max {
            return None;
        }
        client.open += 1;
        let start_at = match pace {
            Some(pace) => {
                let due = client.due.max(now);
                client.due = due + pace.every;
                due.checked_sub(pace.burst).map_or(now, |at| at.max(now))
            }
            None => now,
        };
        drop(clients);
        Some((ClientSlot { clients: self, ip }, start_at))
    }
}

/// One connection of a client; dropping it frees the client's slot.
pub(super) struct ClientSlot {
    clients: Arc<PerClient>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self.clients.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.by_ip.get_mut(&self.ip) {
            c.open -= 1;
            // Its pacing outlives its connections while it is ahead of the rate.
            if c.open == 0 && c.due <= Instant::now() {
                clients.by_ip.remove(&self.ip);
            }
        }
    }
}
