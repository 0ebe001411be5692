use census_proto::{convert, v1};

use super::apply::{self, MemTables, Outcome, Read, ReadData, ReadPart, Tables as _};
use super::*;
use crate::graph::{SubscribedSku, immutable_id_from_ad_guid};

const NOW: u64 = 1_780_000_000_000;
const DAY: u64 = DAY_MS;
const E3: &str = "05e9a617-0261-4cee-bb44-138d3ef5d965";

fn guid(n: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0] = n;
    g[15] = 0xab;
    g
}

fn ad_user(n: u8, name: &str) -> v1::DirectoryUser {
    v1::DirectoryUser {
        object_guid: guid(n).to_vec(),
        object_sid: format!("S-1-5-21-1-2-3-{}", 1000 + u32::from(n)),
        sam_account_name: name.into(),
        user_principal_name: format!("{name}@corp.example"),
        display_name: name.to_uppercase(),
        distinguished_name: format!("CN={name},CN=Users,DC=corp,DC=example"),
        sam_account_type: SAM_NORMAL_USER_ACCOUNT,
        user_account_control: 0x200,
        last_logon: Some(convert::timestamp_from_millis(NOW - 3 * DAY)),
        ..Default::default()
    }
}

fn ad(user: &v1::DirectoryUser) -> Account {
    ad_account("ad:corp.example", user, NOW - DAY).expect("has a guid")
}

fn decide_one(policy: &UserPolicy, a: &Account) -> Decision {
    decide(&Resolved::new(policy, &[]), a, NOW)
}

#[test]
fn each_active_directory_rule_names_itself() {
    let p = UserPolicy::default();
    let ok = decide_one(&p, &ad(&ad_user(1, "alice")));
    assert!(ok.billable, "{}", ok.reason);
    assert!(
        ok.reason.starts_with("enabled user account, last logon"),
        "{}",
        ok.reason
    );

    let cases: Vec<(v1::DirectoryUser, &str)> = vec![
        (
            v1::DirectoryUser {
                user_account_control: 0x202,
                ..ad_user(2, "bob")
            },
            "disabled",
        ),
        (
            v1::DirectoryUser {
                account_expires: Some(convert::timestamp_from_millis(NOW - DAY)),
                ..ad_user(3, "carol")
            },
            "expired",
        ),
        (
            v1::DirectoryUser {
                is_computer: true,
                ..ad_user(4, "pc1$")
            },
            "computer account",
        ),
        (
            v1::DirectoryUser {
                sam_account_type: 805_306_369,
                ..ad_user(5, "weird")
            },
            "not a normal user account",
        ),
        (
            v1::DirectoryUser {
                critical_system_object: true,
                ..ad_user(6, "krbtgt")
            },
            "critical system object",
        ),
        (
            v1::DirectoryUser {
                has_service_principal_name: true,
                ..ad_user(7, "svc-sql")
            },
            "service account",
        ),
        (
            v1::DirectoryUser {
                last_logon: Some(convert::timestamp_from_millis(NOW - 200 * DAY)),
                ..ad_user(8, "gone")
            },
            "stale: last logon",
        ),
        (
            v1::DirectoryUser {
                last_logon: None,
                ..ad_user(9, "never")
            },
            "stale: never logged on and no creation time",
        ),
    ];
    for (user, why) in &cases {
        let d = decide_one(&p, &ad(user));
        assert!(!d.billable, "{} counted", user.sam_account_name);
        assert!(
            d.reason.starts_with(why),
            "{}: {}",
            user.sam_account_name,
            d.reason
        );
    }

    // Not yet expired counts; the policy can count service accounts and drop the logon rule.
    let later = v1::DirectoryUser {
        account_expires: Some(convert::timestamp_from_millis(NOW + DAY)),
        ..ad_user(10, "temp")
    };
    assert!(decide_one(&p, &ad(&later)).billable);
    let lenient = UserPolicy {
        rules: UserPolicyRules {
            stale_logon_days: 0,
            count_service_accounts: true,
            ..UserPolicyRules::default()
        },
        ..UserPolicy::default()
    };
    assert!(decide_one(&lenient, &ad(&cases[5].0)).billable);
    assert!(decide_one(&lenient, &ad(&cases[6].0)).billable);
    assert!(decide_one(&lenient, &ad(&cases[7].0)).billable);
}

#[test]
fn exclusion_groups_match_by_dn_or_name() {
    let member = v1::DirectoryUser {
        member_of: vec!["CN=No Bill,OU=Groups,DC=corp,DC=example".into()],
        ..ad_user(1, "contractor")
    };
    let a = ad(&member);
    for wanted in ["no bill", "cn=no bill,ou=groups,dc=corp,dc=example"] {
        let p = UserPolicy {
            rules: UserPolicyRules {
                exclusion_groups: vec![wanted.into()],
                ..UserPolicyRules::default()
            },
            ..UserPolicy::default()
        };
        let d = decide_one(&p, &a);
        assert!(!d.billable);
        assert!(
            d.reason.starts_with("member of exclusion group CN=No Bill"),
            "{}",
            d.reason
        );
    }
    let other = UserPolicy {
        rules: UserPolicyRules {
            exclusion_groups: vec!["No".into()],
            ..UserPolicyRules::default()
        },
        ..UserPolicy::default()
    };
    assert!(decide_one(&other, &a).billable);
}

/// An agent sends every group a user is in, nested included, up to its cap of 1024: an
/// exclusion group late in a long list still excludes (the old cap of 256 dropped it).
#[test]
fn an_exclusion_group_late_in_a_long_list_still_excludes() {
    let mut groups: Vec<String> = (0..1000)
        .map(|i| format!("CN=Team {i:04},OU=Groups,DC=corp,DC=example"))
        .collect();
    groups.push("CN=Zz Billing Exclusions,OU=Groups,DC=corp,DC=example".into());
    let u = v1::DirectoryUser {
        member_of: groups,
        ..ad_user(1, "many-groups")
    };
    let a = ad(&u);
    let Facts::Ad(f) = &a.facts else {
        panic!("ad facts")
    };
    assert_eq!(f.member_of.len(), 1001, "every group kept");
    let p = UserPolicy {
        rules: UserPolicyRules {
            exclusion_groups: vec!["Zz Billing Exclusions".into()],
            ..UserPolicyRules::default()
        },
        ..UserPolicy::default()
    };
    let d = decide_one(&p, &a);
    assert!(!d.billable, "{}", d.reason);
    assert!(d.reason.contains("Zz Billing Exclusions"), "{}", d.reason);
    // Past the cap, the first MAX_GROUPS in sorted order are kept whatever the order sent.
    let mut reversed = u.clone();
    reversed.member_of = (0..MAX_GROUPS + 50)
        .rev()
        .map(|i| format!("CN=g{i:05}"))
        .collect();
    let Facts::Ad(f) = ad(&reversed).facts else {
        panic!("ad facts")
    };
    assert_eq!(f.member_of.len(), MAX_GROUPS);
    assert_eq!(f.member_of[0], "CN=g00000");
}

#[test]
fn accounts_are_named_for_people() {
    let named = |user: v1::DirectoryUser| ad(&user).name;
    assert_eq!(named(ad_user(1, "alice")), "alice@corp.example");
    assert_eq!(
        named(v1::DirectoryUser {
            user_principal_name: String::new(),
            ..ad_user(2, "bob")
        }),
        "bob"
    );
    assert_eq!(
        named(v1::DirectoryUser {
            user_principal_name: String::new(),
            sam_account_name: " ".into(),
            display_name: "Carol Kiosk".into(),
            ..ad_user(3, "carol")
        }),
        "Carol Kiosk",
        "the display name before the id"
    );
    let mut cloud = graph_user("d1", None, None, &[]);
    cloud.upn = String::new();
    cloud.display_name = "Dave Cloud".into();
    assert_eq!(entra_account("entra:t", &cloud, NOW).name, "Dave Cloud");
    cloud.display_name = String::new();
    assert_eq!(entra_account("entra:t", &cloud, NOW).name, "d1");
}

#[test]
fn hostile_values_are_capped_and_guidless_accounts_refused() {
    let mut u = ad_user(1, &"x".repeat(10_000));
    u.member_of = (0..1000).map(|i| format!("CN=g{i}\n,DC=x")).collect();
    let a = ad(&u);
    assert!(a.name.len() <= MAX_TEXT);
    let Facts::Ad(f) = &a.facts else {
        panic!("ad facts")
    };
    assert!(f.member_of.len() <= MAX_GROUPS);
    assert!(f.member_of.iter().all(|g| !g.contains('\n')));
    u.object_guid = vec![1, 2, 3];
    assert!(ad_account("ad:corp.example", &u, NOW).is_none());
    assert!(ad_source("").is_err());
    assert!(ad_source("a/b").is_err());
    assert_eq!(
        ad_source(" Corp.Example ").as_deref(),
        Ok("ad:corp.example")
    );
}

#[test]
fn an_account_that_never_logged_on_is_stale_only_once_older_than_the_window() {
    let p = UserPolicy::default();
    let never = |n: u8, created_days_ago: Option<u64>| {
        ad(&v1::DirectoryUser {
            last_logon: None,
            when_created: created_days_ago
                .map(|d| convert::timestamp_from_millis(NOW - d * DAY - 60_000)),
            ..ad_user(n, "new")
        })
    };
    // A new hire: billed from the day the account exists.
    let fresh = decide_one(&p, &never(1, Some(3)));
    assert!(fresh.billable, "{}", fresh.reason);
    assert!(
        fresh
            .reason
            .starts_with("enabled user account, never logged on, created ")
            && fresh
                .reason
                .contains("(3 days ago): a new account, billed until it is 90 days old"),
        "{}",
        fresh.reason
    );
    // Created the day the window ends: still new; a day later: stale.
    assert!(decide_one(&p, &never(2, Some(89))).billable);
    let old = decide_one(&p, &never(3, Some(400)));
    assert!(!old.billable);
    assert!(
        old.reason.starts_with("stale: never logged on, created ")
            && old.reason.contains("(400 days ago, more than 90 days)"),
        "{}",
        old.reason
    );
    // No creation time and no logon: stale, saying why.
    let unknown = decide_one(&p, &never(4, None));
    assert!(!unknown.billable);
    assert!(
        unknown
            .reason
            .starts_with("stale: never logged on and no creation time (whenCreated)"),
        "{}",
        unknown.reason
    );
    // A logon decides over the creation time: an old account used last week counts.
    let used = ad(&v1::DirectoryUser {
        when_created: Some(convert::timestamp_from_millis(NOW - 900 * DAY)),
        ..ad_user(5, "old")
    });
    assert!(decide_one(&p, &used).billable);
    // The window follows the policy.
    let short = UserPolicy {
        rules: UserPolicyRules {
            stale_logon_days: 30,
            ..UserPolicyRules::default()
        },
        ..UserPolicy::default()
    };
    let month_old = never(6, Some(45));
    assert!(decide_one(&p, &month_old).billable);
    assert!(!decide_one(&short, &month_old).billable);
    // whenCreated reaches the stored facts.
    let Facts::Ad(facts) = &never(7, Some(3)).facts else {
        panic!("AD facts")
    };
    assert_eq!(facts.created_ms, Some(NOW - 3 * DAY - 60_000));
}

#[test]
fn entra_sign_in_activity_follows_the_same_rule_where_the_tenant_gives_it() {
    let p = UserPolicy::default();
    let at = |days: u64| crate::snapshot::rfc3339(NOW - days * DAY);
    let user = |id: &str, read: bool, last: Option<u64>, created: Option<u64>| {
        let mut u = graph_user(id, None, None, &[E3]);
        u.sign_in_read = read;
        u.last_sign_in = last.map(at);
        u.created = created.map(at);
        entra_account("entra:tenant", &u, NOW)
    };
    let d = |a: &Account| decide(&Resolved::new(&p, &[]), a, NOW);

    let recent = d(&user("u1", true, Some(5), Some(900)));
    assert!(recent.billable);
    assert!(
        recent.reason.starts_with("licensed skuId ") && recent.reason.contains(", last sign-in "),
        "{}",
        recent.reason
    );
    let stale = d(&user("u2", true, Some(200), Some(900)));
    assert!(!stale.billable);
    assert!(
        stale.reason.starts_with("stale: last sign-in "),
        "{}",
        stale.reason
    );
    let new_hire = d(&user("u3", true, None, Some(3)));
    assert!(new_hire.billable);
    assert!(
        new_hire.reason.contains("never signed in, created ")
            && new_hire.reason.contains("a new account"),
        "{}",
        new_hire.reason
    );
    let unused = d(&user("u4", true, None, Some(400)));
    assert!(!unused.billable);
    assert!(
        unused
            .reason
            .starts_with("stale: never signed in, created "),
        "{}",
        unused.reason
    );
    // Without the tenant's sign-in activity (no Entra ID P1), the licence decides alone.
    let no_p1 = d(&user("u5", false, None, Some(400)));
    assert!(no_p1.billable, "{}", no_p1.reason);
    assert!(!no_p1.reason.contains("sign"), "{}", no_p1.reason);
    // A rule turned off is off for Entra ID too; an unlicensed user is not billed either way.
    let off = UserPolicy {
        rules: UserPolicyRules {
            stale_logon_days: 0,
            ..UserPolicyRules::default()
        },
        ..UserPolicy::default()
    };
    assert!(
        decide(
            &Resolved::new(&off, &[]),
            &user("u6", true, Some(900), None),
            NOW
        )
        .billable
    );
}

fn graph_user(id: &str, sid: Option<&str>, immutable: Option<String>, skus: &[&str]) -> GraphUser {
    GraphUser {
        id: id.into(),
        upn: format!("{id}@corp.example"),
        display_name: id.into(),
        enabled: Some(true),
        user_type: Some("Member".into()),
        sku_ids: skus.iter().map(|s| (*s).to_owned()).collect(),
        on_premises_sid: sid.map(Into::into),
        on_premises_immutable_id: immutable,
        on_premises_sync_enabled: Some(true),
        created: None,
        sign_in_read: false,
        last_sign_in: None,
    }
}

#[test]
fn hybrid_users_are_one_person_joined_on_sid_or_guid() {
    let alice = ad(&ad_user(1, "alice"));
    let bob = ad(&ad_user(2, "bob"));
    let carol = ad(&v1::DirectoryUser {
        user_account_control: 0x202,
        ..ad_user(3, "carol")
    });
    // alice by SID, bob by immutable id, carol (disabled on-prem) licensed in the cloud, and a
    // cloud-only dave whose display name equals alice's (names never join).
    let src = "entra:tenant";
    let cloud = vec![
        entra_account(
            src,
            &graph_user("a1", Some("S-1-5-21-1-2-3-1001"), None, &[E3]),
            NOW,
        ),
        entra_account(
            src,
            &graph_user("b1", None, Some(immutable_id_from_ad_guid(&guid(2))), &[]),
            NOW,
        ),
        entra_account(
            src,
            &graph_user("c1", Some("S-1-5-21-1-2-3-1003"), None, &[E3]),
            NOW,
        ),
        Account {
            display_name: "ALICE".into(),
            ..entra_account(src, &graph_user("d1", None, None, &[E3]), NOW)
        },
    ];
    let mut all = vec![alice, bob, carol];
    all.extend(cloud);
    let sources = vec![SourceStatus {
        skus: vec![SubscribedSku {
            sku_id: E3.into(),
            part_number: "SPE_E3".into(),
        }],
        ..SourceStatus::new(src, SourceKind::EntraId)
    }];
    let people = people(&UserPolicy::default(), all, &sources, NOW);
    assert_eq!(people.len(), 4, "{people:#?}");
    let by_name = |n: &str| {
        people
            .iter()
            .find(|p| p.accounts.iter().any(|(a, _)| a.name.starts_with(n)))
            .expect("person")
    };
    let alice = by_name("alice");
    assert_eq!(alice.accounts.len(), 2);
    assert!(alice.counted);
    assert!(
        alice.reason.contains("joined on sid:S-1-5-21-1-2-3-1001"),
        "{}",
        alice.reason
    );
    assert!(alice.id.starts_with("guid:"), "{}", alice.id);
    let bob = by_name("bob");
    assert_eq!(bob.accounts.len(), 2, "joined on the objectGUID");
    assert!(
        bob.counted,
        "the AD account counts, the unlicensed cloud one does not"
    );
    let carol = by_name("carol");
    assert_eq!(carol.accounts.len(), 2);
    assert!(carol.counted, "licensed in the cloud: {}", carol.reason);
    assert!(carol.reason.contains("licensed SPE_E3"), "{}", carol.reason);
    let dave = by_name("d1");
    assert_eq!(dave.accounts.len(), 1);
    assert_eq!(tally(&people, &sources).count, 4);

    // The licence allow-list of the policy decides cloud accounts.
    let only_e5 = UserPolicy {
        rules: UserPolicyRules {
            licence_allow_list: vec!["SPE_E5".into()],
            ..UserPolicyRules::default()
        },
        ..UserPolicy::default()
    };
    let all2: Vec<Account> = people
        .iter()
        .flat_map(|p| p.accounts.iter().map(|(a, _)| a.clone()))
        .collect();
    let strict = super::people(&only_e5, all2, &sources, NOW);
    assert_eq!(
        tally(&strict, &sources).count,
        2,
        "alice and bob by AD only"
    );
}

fn part(read: &str, at: u64, part: u32, parts: u32, users: &[(u8, &str)]) -> ReadPart {
    ReadPart {
        source: "ad:corp.example".into(),
        read_id: read.into(),
        part,
        parts,
        read_at_ms: at,
        error: None,
        accounts: users
            .iter()
            .map(|(n, name)| ad_account("ad:corp.example", &ad_user(*n, name), at).expect("guid"))
            .collect(),
    }
}

fn present(t: &mut MemTables) -> Vec<String> {
    let mut names: Vec<String> = t
        .accounts("ad:corp.example")
        .expect("accounts")
        .into_iter()
        .filter(|a| a.present)
        .map(|a| a.name)
        .collect();
    names.sort();
    names
}

#[test]
fn reads_apply_once_complete_and_keep_history() {
    let mut t = MemTables::default();
    let a = part("r1", 100, 1, 2, &[(1, "alice"), (2, "bob")]);
    let b = part("r1", 100, 2, 2, &[(3, "carol")]);
    assert_eq!(
        apply::apply_part(&mut t, b.clone()),
        Ok(Outcome::Staged { missing: 1 })
    );
    assert!(
        present(&mut t).is_empty(),
        "nothing applies before the read is complete"
    );
    // A resent part is harmless.
    assert_eq!(
        apply::apply_part(&mut t, b),
        Ok(Outcome::Staged { missing: 1 })
    );
    assert_eq!(
        apply::apply_part(&mut t, a.clone()),
        Ok(Outcome::Applied {
            present: 3,
            added: 3,
            removed: 0
        })
    );
    assert!(t.staged.is_empty());
    assert_eq!(present(&mut t).len(), 3);
    // A replay of the applied read changes nothing.
    assert_eq!(apply::apply_part(&mut t, a), Ok(Outcome::Outdated));

    // bob leaves: he stays stored, not present.
    let r2 = part("r2", 200, 1, 1, &[(1, "alice"), (3, "carol")]);
    assert_eq!(
        apply::apply_part(&mut t, r2),
        Ok(Outcome::Applied {
            present: 2,
            added: 0,
            removed: 1
        })
    );
    let bob = t
        .accounts
        .values()
        .find(|a| a.name.starts_with("bob"))
        .expect("bob kept");
    assert_eq!((bob.present, bob.removed_ms), (false, Some(200)));
    let alice = t
        .accounts
        .values()
        .find(|a| a.name.starts_with("alice"))
        .expect("alice");
    assert_eq!((alice.first_seen_ms, alice.last_seen_ms), (100, 200));

    // A failed read keeps everything and marks the source stale; an older read is ignored.
    let failed = ReadPart {
        error: Some("the directory refused the bind".into()),
        accounts: Vec::new(),
        ..part("r3", 300, 1, 1, &[])
    };
    assert_eq!(apply::apply_part(&mut t, failed), Ok(Outcome::Failed));
    let status = t.statuses["ad:corp.example"].clone();
    assert!(status.stale());
    assert_eq!(status.read_ms, Some(200));
    assert!(status.describe().contains("STALE"), "{}", status.describe());
    assert_eq!(present(&mut t).len(), 2);
    let old = part("r0", 50, 1, 1, &[]);
    assert_eq!(apply::apply_part(&mut t, old), Ok(Outcome::Outdated));
    // The next good read clears the error.
    let r4 = part("r4", 400, 1, 1, &[(1, "alice"), (2, "bob"), (3, "carol")]);
    assert!(matches!(
        apply::apply_part(&mut t, r4),
        Ok(Outcome::Applied { added: 0, .. })
    ));
    assert!(!t.statuses["ad:corp.example"].stale());
    assert_eq!(present(&mut t).len(), 3);
}

#[test]
fn unfinished_reads_are_bounded_and_superseded() {
    let mut t = MemTables::default();
    for i in 0..10u64 {
        let p = part(&format!("x{i}"), 100 + i, 1, 3, &[(1, "alice")]);
        assert!(matches!(
            apply::apply_part(&mut t, p),
            Ok(Outcome::Staged { .. })
        ));
    }
    let reads: std::collections::BTreeSet<&str> =
        t.staged.values().map(|p| p.read_id.as_str()).collect();
    assert!(reads.len() <= apply::MAX_PENDING_READS + 1, "{reads:?}");
    let done = part("y", 500, 1, 1, &[(1, "alice")]);
    assert!(matches!(
        apply::apply_part(&mut t, done),
        Ok(Outcome::Applied { .. })
    ));
    assert!(
        t.staged.is_empty(),
        "a newer complete read drops older unfinished ones"
    );
}

#[test]
fn parts_are_checked() {
    let mut p = part("r", 1, 1, 1, &[]);
    assert!(p.check().is_ok());
    p.part = 2;
    assert!(p.check().is_err());
    p.part = 0;
    assert!(p.check().is_err());
    p = part("", 1, 1, 1, &[]);
    assert!(p.check().is_err());
    p = ReadPart {
        error: Some("x".into()),
        ..part("r", 1, 1, 2, &[])
    };
    assert!(p.check().is_err());
}

#[test]
fn entra_reads_replace_and_fail_like_directory_reads() {
    let mut t = MemTables::default();
    let src = "entra:tenant";
    let read = |id: &str, at: u64, users: &[&str]| Read {
        source: src.into(),
        kind: SourceKind::EntraId,
        read_id: id.into(),
        read_at_ms: at,
        outcome: Ok(ReadData {
            accounts: users
                .iter()
                .map(|u| entra_account(src, &graph_user(u, None, None, &[E3]), at))
                .collect(),
            skus: Vec::new(),
        }),
    };
    assert!(matches!(
        apply::apply_read(&mut t, read("g1", 10, &["a", "b"])),
        Ok(Outcome::Applied { present: 2, .. })
    ));
    let failed = Read {
        outcome: Err("invalid client secret".into()),
        ..read("g2", 20, &[])
    };
    assert_eq!(apply::apply_read(&mut t, failed), Ok(Outcome::Failed));
    let accounts = t.accounts(src).expect("accounts");
    assert_eq!(accounts.iter().filter(|a| a.present).count(), 2);
    let statuses: Vec<SourceStatus> = t.statuses.values().cloned().collect();
    let people = people(&UserPolicy::default(), accounts, &statuses, NOW);
    let tl = tally(&people, &statuses);
    assert_eq!((tl.count, tl.stale), (2, true));
    assert!(people.iter().all(|p| p.stale));
}
