//! STOMP 1.2 over WebSocket (PROTOCOL.md §7) for `wsfuzz`: with `--stomp-share`, part of the
//! fuzzing connections upgrade on `/stomp` (or `/ws` offering `v12.stomp`), send `CONNECT` for
//! their user `fz-<n>`, and run STOMP cases instead of JSON ones.
//!
//! Layout: `frame` (client frames rendered from their parts; a strict reader of server frames),
//! `decoder` (a reference decoder of client frames), `model` (the session: what is owed to each
//! frame), `commands` (client frames valid, refused and mutated) and `cases` (the generators),
//! `exec` (the session, pacing under the node's rate limit, running a case), `handshake` (the
//! upgrade and `CONNECT`), `oracle` (judging what came back).

pub mod cases;
mod commands;
pub mod decoder;
pub mod exec;
pub mod frame;
mod handshake;
pub mod model;
pub mod oracle;

/// Whether connection `conn` speaks STOMP when a `share` (0 to 1) of the connections do: the
/// STOMP ones are spread evenly (with 0.5, every second one).
pub fn speaks_stomp(conn: usize, share: f64) -> bool {
    let share = share.clamp(0.0, 1.0);
    ((conn + 1) as f64 * share).floor() > (conn as f64 * share).floor()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_the_connections_speaks_stomp() {
        let count = |share: f64, n: usize| (0..n).filter(|&c| speaks_stomp(c, share)).count();
        assert_eq!(count(0.0, 8), 0);
        assert_eq!(count(1.0, 8), 8);
        assert_eq!(count(0.5, 8), 4);
        assert_eq!(count(0.25, 8), 2);
        assert!(!speaks_stomp(0, 0.5) && speaks_stomp(1, 0.5));
    }
}
