//! What the gateway knows about running replicas between reconciler passes: the ready
//! endpoints of each deployment, the requests in flight on each, and when each deployment was
//! last asked for. The reconciler writes the endpoints; the inference router reads them,
//! counts its requests and wakes deployments that have none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::Notify;

#[derive(Default)]
pub struct Fleet {
    /// Deployment name → ready replica endpoints.
    ready: RwLock<HashMap<String, Vec<String>>>,
    /// Endpoint → requests in flight there.
    in_flight: RwLock<HashMap<String, Arc<AtomicUsize>>>,
    /// (Deployment, adapter model) → the replica that last served it.
    affinity: RwLock<HashMap<(String, String), String>>,
    /// Deployment name → requests waiting for a ready replica (a deployment being woken).
    waiting: RwLock<HashMap<String, Arc<AtomicUsize>>>,
    /// Deployment name → last time a request for it arrived.
    last_request: RwLock<HashMap<String, Instant>>,
    /// Deployment name → tokens its replicas' speculation drafted and accepted, summed over
    /// the replicas it runs now (for the gateway's Prometheus figures).
    speculation: RwLock<HashMap<String, (u64, u64)>>,
    /// Deployment name → demand seen at the other gateways (requests waiting there, their
    /// last request), for the autoscaler of the gateway that runs the reconciler.
    remote: RwLock<HashMap<String, (usize, Option<Instant>)>>,
    /// Wakes the reconciler early (a deployment was woken or changed).
    pub(crate) kicker: Notify,
    /// Signals the router that the ready set changed.
    changed: Notify,
}

/// Counts a request in flight on an endpoint for as long as it lives.
pub struct InFlight {
    counter: Arc<AtomicUsize>,
    pub endpoint: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as waiting for a replica of a deployment for as long as it lives.
pub struct Waiting {
    counter: Arc<AtomicUsize>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Fleet {
    /// Sets one deployment's ready endpoints (none: it has no ready replica).
    pub fn set_ready(&self, deployment: &str, endpoints: Vec<String>) {
        if let Ok(mut r) = self.ready.write() {
            let changed = if endpoints.is_empty() {
                r.remove(deployment).is_some()
            } else if r.get(deployment) != Some(&endpoints) {
                r.insert(deployment.to_string(), endpoints);
                true
            } else {
                false
            };
            if changed {
                self.changed.notify_waiters();
            }
        }
    }

    /// Routes nothing more anywhere (the runtime stood down).
    pub fn clear(&self) {
        if let Ok(mut r) = self.ready.write() {
            if !r.is_empty() {
                r.clear();
                self.changed.notify_waiters();
            }
        }
        if let Ok(mut m) = self.speculation.write() {
            m.clear();
        }
    }

    /// Records a deployment's speculation counts (none: it does not speculate).
    pub fn set_speculation(&self, deployment: &str, counts: Option<(u64, u64)>) {
        if let Ok(mut m) = self.speculation.write() {
            match counts {
                Some(c) => {
                    m.insert(deployment.to_string(), c);
                }
                None => {
                    m.remove(deployment);
                }
            }
        }
    }

    /// Every speculating deployment's (name, drafted tokens, accepted tokens), by name.
    pub fn speculation(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = self
            .speculation
            .read()
            .map(|m| m.iter().map(|(k, &(d, a))| (k.clone(), d, a)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The deployments with ready endpoints.
    pub fn deployments(&self) -> Vec<String> {
        self.ready.read().map(|r| r.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn ready_endpoints(&self, deployment: &str) -> Vec<String> {
        self.ready.read().ok().and_then(|r| r.get(deployment).cloned()).unwrap_or_default()
    }

    /// Picks the ready replica with the fewest requests in flight and counts one more there.
    /// With `model` (an adapter's name), the replica that last served it is preferred while it
    /// has at most one request more than the least loaded: its adapter is likely still hot
    /// there (prepared, one of its `--max-hot-loras`), which a cold replica would first prepare.
    ///
    /// With `session` (a deployment with session affinity, and a request that names its
    /// session), the replica is the session's by rendezvous hashing over the ready replicas,
    /// while it has at most [`SESSION_SLACK`] requests more than the least loaded: a session's
    /// requests meet the same replica's caches, and a replica that leaves moves only its own
    /// sessions.
    pub fn acquire(
        &self,
        deployment: &str,
        exclude: &[String],
        model: Option<&str>,
        session: Option<&str>,
    ) -> Option<InFlight> {
        let endpoints = self.ready_endpoints(deployment);
        let mut best: Option<(usize, String, Arc<AtomicUsize>)> = None;
        let mut loads: Vec<(String, usize, Arc<AtomicUsize>)> = Vec::new();
        for e in endpoints.into_iter().filter(|e| !exclude.contains(e)) {
            let counter = {
                let existing = self.in_flight.read().ok().and_then(|m| m.get(&e).cloned());
                match existing {
                    Some(c) => c,
                    None => match self.in_flight.write() {
                        Ok(mut m) => m.entry(e.clone()).or_default().clone(),
                        Err(_) => continue,
                    },
                }
            };
            let load = counter.load(Ordering::Relaxed);
            if best.as_ref().is_none_or(|(l, _, _)| load < *l) {
                best = Some((load, e.clone(), counter.clone()));
            }
            loads.push((e, load, counter));
        }
        let key = model.map(|m| (deployment.to_string(), m.to_string()));
        if let (Some(key), Some((least, _, _))) = (&key, &best) {
            let warm = self.affinity.read().ok().and_then(|a| a.get(key).cloned());
            if let Some((e, load, counter)) = warm.and_then(|w| loads.iter().find(|(e, _, _)| *e == w).cloned()) {
                if load <= least + 1 {
                    best = Some((load, e, counter));
                }
            }
        }
        if let (Some(session), Some((least, _, _))) = (session, &best) {
            let home = loads.iter().max_by_key(|(e, _, _)| rendezvous(session, e)).cloned();
            if let Some((e, load, counter)) = home.filter(|(_, load, _)| *load <= least + SESSION_SLACK) {
                best = Some((load, e, counter));
            }
        }
        best.map(|(_, endpoint, counter)| {
            counter.fetch_add(1, Ordering::Relaxed);
            if let (Some(key), Ok(mut a)) = (key, self.affinity.write()) {
                a.insert(key, endpoint.clone());
            }
            InFlight { counter, endpoint }
        })
    }

    /// Requests in flight on one replica.
    pub fn in_flight(&self, endpoint: &str) -> usize {
        self.in_flight.read().ok().and_then(|m| m.get(endpoint).map(|c| c.load(Ordering::Relaxed))).unwrap_or(0)
    }

    /// Requests in flight across a deployment's replicas.
    pub fn load(&self, deployment: &str) -> usize {
        let Ok(m) = self.in_flight.read() else { return 0 };
        self.ready_endpoints(deployment).iter().filter_map(|e| m.get(e)).map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Counts a request that found no ready replica: the autoscaler sees it as load.
    pub fn wait_for(&self, deployment: &str) -> Waiting {
        let counter = match self.waiting.write() {
            Ok(mut m) => m.entry(deployment.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting { counter }
    }

    /// Requests waiting for a replica of a deployment.
    pub fn waiting(&self, deployment: &str) -> usize {
        self.waiting.read().ok().and_then(|m| m.get(deployment).map(|c| c.load(Ordering::Relaxed))).unwrap_or(0)
    }

    /// Asks the reconciler for a pass now rather than at its next tick.
    pub fn kick(&self) {
        self.kicker.notify_one();
    }

    pub fn touch(&self, deployment: &str) {
        self.touch_at(deployment, Instant::now());
    }

    /// Records a request for `deployment` as arrived at `at`.
    pub fn touch_at(&self, deployment: &str, at: Instant) {
        if let Ok(mut m) = self.last_request.write() {
            m.insert(deployment.to_string(), at);
        }
    }

    /// When a request for `deployment` last arrived, here or (as last published) at another
    /// gateway.
    pub fn last_request(&self, deployment: &str) -> Option<Instant> {
        let here = self.last_request.read().ok().and_then(|m| m.get(deployment).copied());
        let there = self.remote.read().ok().and_then(|m| m.get(deployment).and_then(|r| r.1));
        here.max(there)
    }

    /// Replaces what the other gateways ask: deployment → (requests waiting there, their last
    /// request).
    pub fn set_remote(&self, remote: HashMap<String, (usize, Option<Instant>)>) {
        if let Ok(mut m) = self.remote.write() {
            *m = remote;
        }
    }

    /// Requests waiting for a replica of `deployment` at the other gateways.
    pub fn remote_waiting(&self, deployment: &str) -> usize {
        self.remote.read().ok().and_then(|m| m.get(deployment).map(|r| r.0)).unwrap_or(0)
    }

    /// This gateway's own demand: (deployment, requests waiting here, last request here) for
    /// every deployment that has had a request here.
    pub fn demand(&self) -> Vec<(String, usize, Option<Instant>)> {
        let last = self.last_request.read().map(|m| m.clone()).unwrap_or_default();
        let waiting: HashMap<String, usize> = self
            .waiting
            .read()
            .map(|m| m.iter().map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed))).collect())
            .unwrap_or_default();
        let mut names: Vec<&String> = last.keys().chain(waiting.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| (n.clone(), waiting.get(n).copied().unwrap_or(0), last.get(n).copied()))
            .filter(|(_, w, l)| *w > 0 || l.is_some())
            .collect()
    }

    /// Waits until the ready set changes (or a short while passes).
    pub async fn wait_changed(&self) {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), self.changed.notified()).await;
    }
}

/// How many requests more than the least loaded replica a session's own replica may have
/// before the session's request goes elsewhere: a quarter of a replica's batch.
pub const SESSION_SLACK: usize = hearth_control::deployments::REPLICA_BATCH_SIZE / 4;

/// A session's score on a replica: the highest-scoring ready replica is its home. The same on
/// every gateway, so they agree without talking.
fn rendezvous(session: &str, endpoint: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d =
        Sha256::new().chain_update(session.as_bytes()).chain_update([0]).chain_update(endpoint.as_bytes()).finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_keeps_its_replica_until_it_is_far_busier_or_gone() {
        let fleet = Fleet::default();
        let three = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
        fleet.set_ready("d", three());
        let home = |s: &str| fleet.acquire("d", &[], None, Some(s)).expect("a replica");
        // Every request of a session lands on one replica, whatever the others carry.
        let first = home("s1");
        let mut held = vec![];
        for _ in 0..SESSION_SLACK {
            let again = home("s1");
            assert_eq!(again.endpoint, first.endpoint);
            held.push(again);
        }
        drop(held);
        drop(first);
        // Sessions spread over the replicas.
        let homes: std::collections::HashSet<String> = (0..30)
            .map(|i| fleet.acquire("d", &[], None, Some(&format!("user-{i}"))).unwrap().endpoint.clone())
            .collect();
        assert_eq!(homes.len(), 3, "{homes:?}");
        // Far busier than the others: the session's next request goes elsewhere.
        let busy: Vec<InFlight> = (0..SESSION_SLACK + 1).map(|_| home("s1")).collect();
        let home_of_s1 = busy[0].endpoint.clone();
        let moved = home("s1");
        assert_ne!(moved.endpoint, home_of_s1);
        drop(busy);
        drop(moved);
        // A replica that leaves moves only its own sessions.
        let before: Vec<String> = (0..30).map(|i| home(&format!("u{i}")).endpoint.clone()).collect();
        let gone = before[0].clone();
        fleet.set_ready("d", three().into_iter().filter(|e| *e != gone).collect());
        for (i, was) in before.iter().enumerate() {
            let now = home(&format!("u{i}")).endpoint.clone();
            if *was != gone {
                assert_eq!(&now, was, "session u{i} moved although its replica stayed");
            } else {
                assert_ne!(now, gone);
            }
        }
    }

    #[test]
    fn least_loaded_first_and_an_adapter_sticks_to_its_warm_replica() {
        let fleet = Fleet::default();
        fleet.set_ready("d", vec!["a".to_string(), "b".to_string()]);
        let first = fleet.acquire("d", &[], Some("lora-x"), None).expect("a replica");
        // The same adapter goes back to its replica while that has at most one more request...
        let second = fleet.acquire("d", &[], Some("lora-x"), None).expect("a replica");
        assert_eq!(second.endpoint, first.endpoint);
        // ...but not once it is two ahead: then the least loaded wins, and becomes the warm one.
        let third = fleet.acquire("d", &[], Some("lora-x"), None).expect("a replica");
        assert_ne!(third.endpoint, first.endpoint);
        // The base model (no adapter) only looks at load.
        let base = fleet.acquire("d", &[], None, None).expect("a replica");
        assert_eq!(base.endpoint, third.endpoint, "b has 1 in flight, a has 2");
        drop((first, second));
        assert_eq!(fleet.in_flight("a"), 0);
        assert!(fleet.acquire("d", &["a".to_string(), "b".to_string()], None, None).is_none());
    }
}
