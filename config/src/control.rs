//! The control channel's requests (`scripts/phalanx ctl`, docs/control.md): one line each,
//! `[@TAG] COMMAND [ARGUMENTS]`, parsed here (pure, host-tested); the hypervisor runs them.
//! A reservation is written as in the config file, braces, `=` and commas optional:
//! `set-reservation web { budget_us = 2000, period_us = 10000 }`, or
//! `set-reservation web budget_us=2000 period_us=10000`.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::schema::Reservation;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Partitions, their state, reservation, CPU share and progress so far.
    Status,
    /// A partition's or group's new reservation, checked and switched to at a frame boundary.
    SetReservation { node: String, reservation: Reservation },
    /// Stops a partition (its slots idle, or are lent); `start` boots it again.
    Stop(String),
    /// Boots a stopped partition again from its payload.
    Start(String),
    /// Resets a partition: its payload reloaded, started again.
    Reset(String),
    /// Revokes a shared memory region: unmapped from every partition but its owner.
    Revoke(String),
    /// Ends the run at the second frame boundary from now: final records, power off.
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `@TAG`, repeated in the reply (the host tool matches replies by it).
    pub tag: Option<u64>,
    pub command: Command,
}

/// The commands, for the error that lists them.
pub const COMMANDS: &str = "status, set-reservation NAME {...}, stop NAME, start NAME, reset NAME, revoke REGION, end";

pub fn parse_request(line: &str) -> Result<Request, String> {
    let mut words = line.split_whitespace().peekable();
    let tag = match words.peek().and_then(|w| w.strip_prefix('@')) {
        Some(tag) => {
            let tag = tag.parse().map_err(|_| format!("tag `@{tag}`: not a number"))?;
            words.next();
            Some(tag)
        }
        None => None,
    };
    let verb = words.next().ok_or_else(|| format!("empty request; commands: {COMMANDS}"))?;
    let mut name = || -> Result<String, String> {
        words
            .next()
            .map(ToString::to_string)
            .ok_or_else(|| format!("`{verb}` needs a name (a partition; `revoke`: a shared region)"))
    };
    let command = match verb {
        "status" => Command::Status,
        "end" => Command::End,
        "stop" => Command::Stop(name()?),
        "start" => Command::Start(name()?),
        "reset" => Command::Reset(name()?),
        "revoke" => Command::Revoke(name()?),
        "set-reservation" => {
            let node = words.next().ok_or("`set-reservation` needs a partition or group name and a reservation")?;
            let rest: Vec<&str> = words.by_ref().collect();
            Command::SetReservation { node: node.to_string(), reservation: parse_reservation(&rest.join(" "))? }
        }
        other => return Err(format!("unknown command `{other}`; commands: {COMMANDS}")),
    };
    if let Some(extra) = words.next() {
        return Err(format!("`{verb}`: unexpected `{extra}`"));
    }
    Ok(Request { tag, command })
}

/// `{ budget_us = B, period_us = P }`, `{ share_percent = S }` or `{ weight = W }`, with or
/// without braces, spaces around `=` and commas.
fn parse_reservation(text: &str) -> Result<Reservation, String> {
    let words: Vec<&str> =
        text.split(|c: char| c.is_whitespace() || "{}=,".contains(c)).filter(|w| !w.is_empty()).collect();
    if !words.len().is_multiple_of(2) || words.is_empty() {
        return Err(format!("reservation `{text}`: give {{ budget_us = B, period_us = P }}, {{ share_percent = S }} or {{ weight = W }}"));
    }
    let mut pairs = Vec::new();
    for pair in words.chunks(2) {
        let value: u64 = pair[1].parse().map_err(|_| format!("reservation: `{}` is not a number", pair[1]))?;
        pairs.push((pair[0], value));
    }
    let get = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|&(_, v)| v);
    if let Some((unknown, _)) =
        pairs.iter().find(|(k, _)| !["budget_us", "period_us", "share_percent", "weight"].contains(k))
    {
        return Err(format!("reservation: unknown key `{unknown}` (budget_us, period_us, share_percent, weight)"));
    }
    let small = |key: &str, v: u64| u32::try_from(v).map_err(|_| format!("reservation: {key} = {v} is too large"));
    match (get("budget_us"), get("period_us"), get("share_percent"), get("weight"), pairs.len()) {
        (Some(budget_us), Some(period_us), None, None, 2) => Ok(Reservation::Hard { budget_us, period_us }),
        (None, None, Some(s), None, 1) => Ok(Reservation::FixedShare { percent: small("share_percent", s)? }),
        (None, None, None, Some(w), 1) => Ok(Reservation::Weight(small("weight", w)?)),
        _ => Err(format!(
            "reservation `{text}`: give exactly one of {{ budget_us, period_us }} (hard), {{ share_percent }} or {{ weight }}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(line: &str) -> Command {
        parse_request(line).unwrap_or_else(|e| panic!("{line}: {e}")).command
    }

    #[test]
    fn reservations_parse_as_the_file_writes_them_or_plainer() {
        let hard = Command::SetReservation {
            node: "web".into(),
            reservation: Reservation::Hard { budget_us: 2000, period_us: 10000 },
        };
        assert_eq!(command("set-reservation web { budget_us = 2000, period_us = 10000 }"), hard);
        assert_eq!(command("set-reservation web budget_us=2000 period_us=10000"), hard);
        assert_eq!(command("set-reservation web {period_us=10000,budget_us=2000}"), hard);
        assert_eq!(
            command("set-reservation g share_percent=30"),
            Command::SetReservation { node: "g".into(), reservation: Reservation::FixedShare { percent: 30 } }
        );
        assert_eq!(
            command("set-reservation batch { weight = 3 }"),
            Command::SetReservation { node: "batch".into(), reservation: Reservation::Weight(3) }
        );
    }

    #[test]
    fn tags_and_the_other_commands() {
        let r = parse_request("@42 status").unwrap();
        assert_eq!((r.tag, r.command), (Some(42), Command::Status));
        assert_eq!(command("stop web"), Command::Stop("web".into()));
        assert_eq!(command("start web"), Command::Start("web".into()));
        assert_eq!(command("reset web"), Command::Reset("web".into()));
        assert_eq!(command("revoke ring"), Command::Revoke("ring".into()));
        assert_eq!(command("  end  "), Command::End);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let error = |line: &str| parse_request(line).unwrap_err();
        assert!(error("").contains("commands: status"));
        assert!(error("frobnicate").contains("unknown command `frobnicate`"));
        assert!(error("stop").contains("needs a name"));
        assert!(error("stop a b").contains("unexpected `b`"));
        assert!(error("@x status").contains("not a number"));
        assert!(error("set-reservation web").contains("budget_us"));
        assert!(error("set-reservation web budget_us=2000").contains("exactly one"));
        assert!(error("set-reservation web budget_us=2000 weight=1").contains("exactly one"));
        assert!(error("set-reservation web budget_us=lots period_us=1").contains("not a number"));
        assert!(error("set-reservation web budget=1 period_us=1").contains("unknown key `budget`"));
        assert!(error("set-reservation web weight=99999999999").contains("too large"));
    }
}
