//! The checks every presence passes, one per test (see `presence_suite!`).

use super::*;

/// The first session brings a user into a room, the last one takes them out.
pub(crate) async fn a_user_enters_a_room_once(p: &dyn Presence) {
    let (lobby, alice) = (room("lobby"), user("alice"));
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap(), "first session brings the user in");
    assert!(!p.join(&lobby, &alice, SessionId(2)).await.unwrap(), "second session does not");
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (1, vec![alice.clone()]));
    assert!(!p.leave(&lobby, &alice, SessionId(1)).await.unwrap(), "one session is still in");
    assert!(p.leave(&lobby, &alice, SessionId(2)).await.unwrap(), "the last session takes the user out");
    assert!(!p.leave(&lobby, &alice, SessionId(2)).await.unwrap(), "leaving twice is not a second leave");
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (0, vec![]));
    assert!(p.join(&lobby, &alice, SessionId(3)).await.unwrap(), "a user can come back");
}

/// Joining again with the same session changes nothing: one leave undoes it.
pub(crate) async fn joining_twice_with_one_session_counts_once(p: &dyn Presence) {
    let (lobby, alice) = (room("lobby"), user("alice"));
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(!p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(p.leave(&lobby, &alice, SessionId(1)).await.unwrap(), "one leave undoes both joins");
    assert_eq!(p.room(&lobby, 10).await.unwrap().0, 0);
}

/// A session that is not in the room leaves nothing, whoever it belongs to.
pub(crate) async fn leaving_an_unknown_session_is_not_a_leave(p: &dyn Presence) {
    let (lobby, alice) = (room("lobby"), user("alice"));
    assert!(!p.leave(&lobby, &alice, SessionId(1)).await.unwrap(), "never joined");
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(!p.leave(&lobby, &alice, SessionId(2)).await.unwrap(), "another session of the user");
    assert!(!p.leave(&lobby, &user("bob"), SessionId(1)).await.unwrap(), "the same session id, another user");
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (1, vec![alice]));
}

/// Membership of one room says nothing about another.
pub(crate) async fn rooms_are_independent(p: &dyn Presence) {
    let (lobby, chat, alice) = (room("lobby"), room("chat"), user("alice"));
    assert!(p.join(&lobby, &alice, SessionId(1)).await.unwrap());
    assert!(p.join(&chat, &alice, SessionId(1)).await.unwrap(), "another room is entered separately");
    assert!(p.leave(&lobby, &alice, SessionId(1)).await.unwrap());
    assert_eq!(p.room(&chat, 10).await.unwrap(), (1, vec![alice]));
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (0, vec![]));
}

/// Sessions are listed with what connect recorded, counted per user, and gone once disconnected.
pub(crate) async fn sessions_are_listed_and_counted(p: &dyn Presence) {
    let users = [user("alice"), user("bob"), user("carol")];
    assert_eq!(p.session_counts(&[]).await.unwrap(), Vec::<usize>::new());
    assert_eq!(p.session_counts(&users).await.unwrap(), vec![0, 0, 0]);
    p.connect(&info("alice", 1, "n1")).await.unwrap();
    p.connect(&info("alice", 2, "n1")).await.unwrap();
    p.connect(&info("bob", 3, "n1")).await.unwrap();
    assert_eq!(p.session_counts(&users).await.unwrap(), vec![2, 1, 0]);

    let listed = p.sessions(&users[0]).await.unwrap();
    assert_eq!(listed.iter().map(|s| s.session).collect::<Vec<_>>(), [SessionId(1), SessionId(2)], "oldest first");
    let first = &listed[0];
    assert_eq!((first.session, first.user.as_str(), &*first.node), (SessionId(1), "alice", "n1"));
    assert_eq!((first.device.as_deref(), first.connected_at), (Some("dev-1"), 1_001));

    p.disconnect(&info("alice", 1, "n1")).await.unwrap();
    let left: Vec<SessionId> = p.sessions(&users[0]).await.unwrap().iter().map(|s| s.session).collect();
    assert_eq!(left, vec![SessionId(2)]);
    assert_eq!(p.session_counts(&users).await.unwrap(), vec![1, 1, 0]);
    assert!(p.sessions(&users[2]).await.unwrap().is_empty());
}

/// Disconnecting a session never connected, or twice, changes nothing.
pub(crate) async fn disconnecting_an_unknown_session_changes_nothing(p: &dyn Presence) {
    let alice = user("alice");
    p.disconnect(&info("carol", 9, "n1")).await.unwrap();
    p.connect(&info("alice", 1, "n1")).await.unwrap();
    p.disconnect(&info("alice", 2, "n1")).await.unwrap();
    assert_eq!(p.session_counts(std::slice::from_ref(&alice)).await.unwrap(), vec![1], "another session");
    p.disconnect(&info("alice", 1, "n1")).await.unwrap();
    p.disconnect(&info("alice", 1, "n1")).await.unwrap();
    assert_eq!(p.session_counts(&[alice, user("carol")]).await.unwrap(), vec![0, 0]);
}

/// A room lists its users sorted, up to the limit, with the full count.
pub(crate) async fn room_listing_is_sorted_and_limited(p: &dyn Presence) {
    let lobby = room("lobby");
    for (i, name) in ["dave", "alice", "carol", "bob"].into_iter().enumerate() {
        assert!(p.join(&lobby, &user(name), SessionId(i as u64 + 1)).await.unwrap());
    }
    let all = vec![user("alice"), user("bob"), user("carol"), user("dave")];
    assert_eq!(p.room(&lobby, 10).await.unwrap(), (4, all.clone()));
    assert_eq!(p.room(&lobby, 2).await.unwrap(), (4, all[..2].to_vec()));
    assert_eq!(p.room(&lobby, 0).await.unwrap(), (4, vec![]));
    assert_eq!(p.room(&room("empty"), 10).await.unwrap(), (0, vec![]));
}
