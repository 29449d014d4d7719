/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Service lookup and backend choice over weir_services / weir_backends. */
#pragma once

#include "maps.h"

/* Looks up the master entry of a frontend. In-cluster traffic (internal)
 * uses the internal-scope entry when the frontend has one, which is how an
 * internal traffic policy differing from the external one is expressed. */
WEIR_INLINE struct weir_svc_val *weir_lb_lookup(struct weir_svc_key *key, __be32 addr, __be16 port, __u8 proto,
						int internal)
{
	struct weir_svc_val *svc;

	__builtin_memset(key, 0, sizeof(*key));
	key->addr = addr;
	key->port = port;
	key->proto = proto;
	key->scope = WEIR_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&weir_services, key);
	if (svc && internal && (svc->flags2 & WEIR_SVC_F2_TWO_SCOPES)) {
		key->scope = WEIR_SCOPE_INTERNAL;
		svc = bpf_map_lookup_elem(&weir_services, key);
	}
	return svc;
}

/* Whether the translated flow of e still matches the service the packet
 * is addressed to (svc, possibly gone) and a backend that keeps flows. */
WEIR_INLINE int weir_lb_flow_current(const struct weir_ct_entry *e, const struct weir_svc_val *svc)
{
	struct weir_backend *be;
	__u32 id = e->backend_id;

	if (!svc || e->rev_nat != svc->rev_nat)
		return 0;
	be = bpf_map_lookup_elem(&weir_backends, &id);
	/* A removed (or quarantined) backend loses its flows; a terminating
	 * one keeps them. */
	return be && be->state != WEIR_BACKEND_QUARANTINED && be->addr == e->nat_daddr && be->port == e->nat_dport;
}

/* Picks the backend of the frontend in key (as left by weir_lb_lookup) in
 * slot hash % count. Returns the backend or NULL when the frontend has
 * none. */
WEIR_INLINE struct weir_backend *weir_lb_pick_by(struct weir_svc_key *key, const struct weir_svc_val *svc, __u32 hash,
						 __u32 *backend_id)
{
	struct weir_svc_key slot_key = *key;
	struct weir_svc_val *slot;

	if (svc->count == 0)
		return NULL;
	slot_key.slot = (hash % svc->count) + 1;
	slot = bpf_map_lookup_elem(&weir_services, &slot_key);
	if (!slot)
		return NULL;
	*backend_id = slot->backend_id;
	return bpf_map_lookup_elem(&weir_backends, backend_id);
}

/* Picks a backend with uniform random choice over the frontend's slots. */
WEIR_INLINE struct weir_backend *weir_lb_pick(struct weir_svc_key *key, const struct weir_svc_val *svc,
					      __u32 *backend_id)
{
	return weir_lb_pick_by(key, svc, bpf_get_prandom_u32(), backend_id);
}

/* Whether an affinity record still holds: recent enough and its backend
 * still active. Returns the backend or NULL. */
WEIR_INLINE struct weir_backend *weir_lb_affinity_check(const struct weir_svc_val *svc,
							 const struct weir_affinity_entry *a, __u32 now,
							 __u32 *backend_id)
{
	struct weir_backend *be;

	if (!a || now - a->last_used > svc->affinity_timeout)
		return NULL;
	be = bpf_map_lookup_elem(&weir_backends, &a->backend_id);
	if (!be || be->state != WEIR_BACKEND_ACTIVE)
		return NULL;
	*backend_id = a->backend_id;
	return be;
}

/* Session affinity (sessionAffinity: ClientIP): a new flow of a client
 * goes to the backend the client used last, while that is recent enough
 * and the backend is still active. Returns the backend or NULL. */
WEIR_INLINE struct weir_backend *weir_lb_affinity(const struct weir_svc_val *svc, __be32 client, __u32 now,
						  __u32 *backend_id)
{
	struct weir_affinity_key key = {.client = client, .rev_nat = svc->rev_nat};

	if (!(svc->flags2 & WEIR_SVC_F2_AFFINITY))
		return NULL;
	return weir_lb_affinity_check(svc, bpf_map_lookup_elem(&weir_affinity, &key), now, backend_id);
}

/* Remembers the backend a client got, for session affinity. */
WEIR_INLINE void weir_lb_affinity_update(const struct weir_svc_val *svc, __be32 client, __u32 backend_id, __u32 now)
{
	struct weir_affinity_key key = {.client = client, .rev_nat = svc->rev_nat};
	struct weir_affinity_entry val = {.backend_id = backend_id, .last_used = now};

	if (svc->flags2 & WEIR_SVC_F2_AFFINITY)
		bpf_map_update_elem(&weir_affinity, &key, &val, BPF_ANY);
}

/*
 * The backend a new flow of client to the frontend in key (as left by
 * weir_lb_lookup) gets: the one session affinity keeps it on, else
 * preferred (a consistent choice such as Maglev's; 0 for none) while it
 * is active, else a random one, remembered for affinity. Fills o's
 * translation (the backend as destination, the flow's backend and
 * frontend) and returns 0, or returns -1 when the frontend has no
 * backend.
 */
WEIR_INLINE int weir_lb_choose_pref(struct weir_svc_key *key, const struct weir_svc_val *svc, __be32 client, __u32 now,
				    struct weir_ct_entry *o, __u32 preferred)
{
	struct weir_backend *be;
	__u32 backend_id = 0;

	be = weir_lb_affinity(svc, client, now, &backend_id);
	if (!be && preferred) {
		be = bpf_map_lookup_elem(&weir_backends, &preferred);
		if (be && be->state == WEIR_BACKEND_ACTIVE)
			backend_id = preferred;
		else
			be = NULL;
	}
	if (!be)
		be = weir_lb_pick(key, svc, &backend_id);
	if (!be)
		return -1;
	weir_lb_affinity_update(svc, client, backend_id, now);
	o->nat_daddr = be->addr;
	o->nat_dport = be->port;
	o->backend_id = backend_id;
	o->rev_nat = svc->rev_nat;
	return 0;
}

/* weir_lb_choose_pref without a preferred backend. */
WEIR_INLINE int weir_lb_choose(struct weir_svc_key *key, const struct weir_svc_val *svc, __be32 client, __u32 now,
			       struct weir_ct_entry *o)
{
	return weir_lb_choose_pref(key, svc, client, now, o, 0);
}
