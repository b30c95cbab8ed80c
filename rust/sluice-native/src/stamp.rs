//! Queue ids and dates for the trace header: the clock and the randomness that the
//! sans-I/O protocol crate leaves to its caller.
//!
//! A queue id is the same 18 characters `appliance.queue.new_queue_id` makes: 8 base-62
//! digits of milliseconds since the epoch, then 10 of 59 random bits. The alphabet is in
//! ASCII order and the time part fixed-width, so ids sort by arrival as plain strings and
//! as LMDB keys; the random part keeps ids unique across processes and boxes.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn base62(mut n: u64, width: usize, out: &mut String) {
    let mut digits = vec![b'0'; width];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes into our live buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // Never seen on Linux for 8 bytes; fall back to the clock's nanoseconds mixed
        // with the thread's stack address rather than failing the message.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let local = 0u8;
        return (nanos as u64) ^ ((&local as *const u8 as u64).rotate_left(32));
    }
    u64::from_le_bytes(bytes)
}

/// A new queue id (see the module header).
pub fn new_queue_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut qid = String::with_capacity(18);
    base62(millis, 8, &mut qid);
    base62(random_u64() >> 5, 10, &mut qid);
    qid
}

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

thread_local! {
    // The date changes once a second: formatted once per second and thread.
    static LAST_DATE: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

/// Now as an RFC 5322 date-time in the local time zone, e.g.
/// "Thu, 03 Dec 2026 16:20:00 +0100" (as Python's `email.utils.formatdate(localtime=True)`).
pub fn rfc5322_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    LAST_DATE.with(|cell| {
        let mut last = cell.borrow_mut();
        if last.0 != secs {
            *last = (secs, format_local(secs));
        }
        last.1.clone()
    })
}

fn format_local(secs: i64) -> String {
    let time: libc::time_t = secs as libc::time_t;
    // SAFETY: localtime_r reads `time` and fills our zeroed `tm`; both live on this stack.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&time, &mut tm).is_null() };
    if !ok {
        tm.tm_gmtoff = 0;
    }
    let offset = tm.tm_gmtoff / 60;
    let sign = if offset < 0 { '-' } else { '+' };
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} {}{:02}{:02}",
        DAYS[(tm.tm_wday.rem_euclid(7)) as usize],
        tm.tm_mday,
        MONTHS[(tm.tm_mon.rem_euclid(12)) as usize],
        tm.tm_year + 1900,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        sign,
        offset.abs() / 60,
        offset.abs() % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_have_the_python_shape_and_sort_by_time() {
        let a = new_queue_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_queue_id();
        assert_eq!(a.len(), 18);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert!(a[..8] < b[..8], "{a} {b}");
        assert_ne!(a[8..], b[8..]);
    }

    #[test]
    fn base62_is_fixed_width() {
        let mut s = String::new();
        base62(61, 3, &mut s);
        base62(62, 3, &mut s);
        assert_eq!(s, "00z010");
    }

    #[test]
    fn date_looks_like_rfc5322() {
        let date = rfc5322_now();
        let parts: Vec<&str> = date.split(' ').collect();
        assert_eq!(parts.len(), 6, "{date}");
        assert!(DAYS.contains(&parts[0].trim_end_matches(',')));
        assert!(MONTHS.contains(&parts[2]));
        assert_eq!(parts[4].len(), 8);
        assert!(parts[5].starts_with(['+', '-']) && parts[5].len() == 5);
    }
}
