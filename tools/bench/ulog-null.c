/*
 * ulog-null: a null dm-log-userspace responder, the protocol's own ceiling.
 *
 *     ulog-null [--realtime PRIO]
 *
 * Joins the connector group CN_IDX_DM and answers every kernel request with a
 * correctly shaped but trivial reply: every region is in sync and clean, there
 * is never resync work, marks and clears are forgotten, flushes do nothing.  A
 * mirror on it works (nosync tables; it keeps no dirty state at all, so it is a
 * benchmark baseline and nothing else).  What a mirror reaches with it is what
 * ANY userspace log (ulogd, cmirrord) can reach on the same machine: the cost of
 * the kernel round trips themselves.  tools/bench/ulog compiles it at run time.
 *
 * Written from the protocol description in <linux/dm-log-userspace.h> and
 * shared/reference/kernel-protocol.md.  It prints "ready <port id>" once the
 * kernel can reach it; on SIGUSR1 it prints "requests N unknown_log M T:n ..."
 * (counts so far, T:n per request type); on SIGTERM/SIGINT it prints them and
 * exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/connector.h>
#include <linux/dm-ioctl.h>
#include <linux/dm-log-userspace.h>
#include <linux/netlink.h>

#ifndef SOL_NETLINK
#define SOL_NETLINK 270
#endif

#define MAX_LOGS 64
#define BUF_SIZE (CONNECTOR_MAX_MSG_SIZE + 256)
#define HDRS (NLMSG_HDRLEN + sizeof(struct cn_msg))

struct nlog {
	int used;
	uint64_t luid;
	char uuid[DM_UUID_LEN];
	uint64_t region_size;
	uint64_t region_count;
	char type[32];
	char dev[64];
};

static struct nlog logs[MAX_LOGS];
static volatile sig_atomic_t stop, report;
static unsigned long long requests, unknown_log, by_type[DM_ULOG_REQUEST_MASK + 1];

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		report = 1;
	else
		stop = 1;
}

static void print_counts(void)
{
	printf("requests %llu unknown_log %llu", requests, unknown_log);
	for (int t = 0; t <= DM_ULOG_REQUEST_MASK; t++)
		if (by_type[t])
			printf(" %d:%llu", t, by_type[t]);
	printf("\n");
	fflush(stdout);
}

static struct nlog *find(const struct dm_ulog_request *rq)
{
	for (int i = 0; i < MAX_LOGS; i++)
		if (logs[i].used && logs[i].luid == rq->luid &&
		    !strncmp(logs[i].uuid, rq->uuid, DM_UUID_LEN))
			return &logs[i];
	return NULL;
}

/* "<target sectors> <type> [<dev>] <region_size> [sync|nosync]" */
static int ctr(const struct dm_ulog_request *rq)
{
	char args[512], *save = NULL, *w[6];
	int n = 0;
	size_t len = rq->data_size < sizeof(args) - 1 ? rq->data_size : sizeof(args) - 1;
	struct nlog *lg = find(rq);

	memcpy(args, rq->data, len);
	args[len] = '\0';
	for (char *t = strtok_r(args, " ", &save); t && n < 6; t = strtok_r(NULL, " ", &save))
		w[n++] = t;
	if (n < 3)
		return -EINVAL;
	int disk = strstr(w[1], "disk") != NULL;
	if (disk && n < 4)
		return -EINVAL;
	uint64_t sectors = strtoull(w[0], NULL, 10);
	uint64_t rsize = strtoull(w[disk ? 3 : 2], NULL, 10);
	if (!sectors || !rsize || (rsize & (rsize - 1)))
		return -EINVAL;
	if (!lg) {
		for (int i = 0; i < MAX_LOGS && !lg; i++)
			if (!logs[i].used)
				lg = &logs[i];
		if (!lg)
			return -ENOMEM;
	}
	memset(lg, 0, sizeof(*lg));
	lg->used = 1;
	lg->luid = rq->luid;
	memcpy(lg->uuid, rq->uuid, DM_UUID_LEN);
	lg->region_size = rsize;
	lg->region_count = (sectors + rsize - 1) / rsize;
	snprintf(lg->type, sizeof(lg->type), "%s", w[1]);
	snprintf(lg->dev, sizeof(lg->dev), "%s", disk ? w[2] : "");
	return 0;
}

/* Fill the reply payload for rq; returns its size, sets *error. */
static size_t answer(const struct dm_ulog_request *rq, char *out, int *error)
{
	uint32_t type = DM_ULOG_REQUEST_TYPE(rq->request_type);
	struct nlog *lg;
	int64_t *s = (int64_t *)out;
	uint64_t *u = (uint64_t *)out;

	*error = 0;
	if (type == DM_ULOG_CTR) {
		*error = ctr(rq);
		return 0; /* no device name: also right for the reconnect CTR */
	}
	lg = find(rq);
	if (!lg) {
		if (type == DM_ULOG_DTR)
			return 0;
		unknown_log++;
		*error = -ESRCH; /* the kernel reconnects (CTR + RESUME) */
		return 0;
	}
	switch (type) {
	case DM_ULOG_DTR:
		lg->used = 0;
		return 0;
	case DM_ULOG_PRESUSPEND:
	case DM_ULOG_POSTSUSPEND:
	case DM_ULOG_RESUME:
	case DM_ULOG_FLUSH:
	case DM_ULOG_MARK_REGION:
	case DM_ULOG_CLEAR_REGION:
	case DM_ULOG_SET_REGION_SYNC:
		return 0;
	case DM_ULOG_GET_REGION_SIZE:
		u[0] = lg->region_size;
		return 8;
	case DM_ULOG_IS_CLEAN:
	case DM_ULOG_IN_SYNC:
		s[0] = 1;
		return 8;
	case DM_ULOG_GET_RESYNC_WORK:
		s[0] = 0;
		u[1] = 0;
		return 16;
	case DM_ULOG_GET_SYNC_COUNT:
		u[0] = lg->region_count;
		return 8;
	case DM_ULOG_IS_REMOTE_RECOVERING:
		s[0] = 0;
		u[1] = lg->region_count;
		return 16;
	case DM_ULOG_STATUS_INFO:
		if (lg->dev[0])
			return (size_t)snprintf(out, 256, "3 %s %s A", lg->type, lg->dev) + 1;
		return (size_t)snprintf(out, 256, "1 %s", lg->type) + 1;
	case DM_ULOG_STATUS_TABLE:
		if (lg->dev[0])
			return (size_t)snprintf(out, 256, "%s 2 %s %llu ", lg->type, lg->dev,
						(unsigned long long)lg->region_size) + 1;
		return (size_t)snprintf(out, 256, "%s 1 %llu ", lg->type,
					(unsigned long long)lg->region_size) + 1;
	default:
		*error = -EINVAL;
		return 0;
	}
}

int main(int argc, char **argv)
{
	static char rbuf[BUF_SIZE] __attribute__((aligned(8)));
	static char sbuf[BUF_SIZE] __attribute__((aligned(8)));
	struct sockaddr_nl addr = { .nl_family = AF_NETLINK }, from;
	struct sigaction sa = { .sa_handler = on_signal }; /* no SA_RESTART: recv gets EINTR */
	int group = CN_IDX_DM, rcvbuf = 32 << 20;

	if (argc == 3 && !strcmp(argv[1], "--realtime")) {
		struct sched_param sp = { .sched_priority = atoi(argv[2]) };
		if (sched_setscheduler(0, SCHED_FIFO, &sp))
			perror("sched_setscheduler");
		if (mlockall(MCL_CURRENT | MCL_FUTURE))
			perror("mlockall");
	} else if (argc != 1) {
		fprintf(stderr, "usage: %s [--realtime PRIO]\n", argv[0]);
		return 2;
	}
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);

	int fd = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR);
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) ||
	    setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group))) {
		perror("ulog-null: connector socket");
		return 1;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)))
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	socklen_t alen = sizeof(addr);
	getsockname(fd, (struct sockaddr *)&addr, &alen);
	printf("ready %u\n", addr.nl_pid);
	fflush(stdout);

	while (!stop) {
		if (report) {
			report = 0;
			print_counts();
		}
		socklen_t flen = sizeof(from);
		ssize_t n = recvfrom(fd, rbuf, sizeof(rbuf), 0, (struct sockaddr *)&from, &flen);
		if (n < 0) {
			if (errno == EINTR || errno == ENOBUFS)
				continue;
			perror("ulog-null: recv");
			return 1;
		}
		if (from.nl_pid != 0)
			continue; /* only the kernel's requests */
		for (struct nlmsghdr *nh = (struct nlmsghdr *)rbuf; NLMSG_OK(nh, n);
		     nh = NLMSG_NEXT(nh, n)) {
			struct cn_msg *cn = NLMSG_DATA(nh);
			if (nh->nlmsg_type != NLMSG_DONE ||
			    nh->nlmsg_len < HDRS + sizeof(struct dm_ulog_request) ||
			    cn->id.idx != CN_IDX_DM || cn->id.val != CN_VAL_DM_USERSPACE_LOG ||
			    cn->len < sizeof(struct dm_ulog_request))
				continue;
			struct dm_ulog_request *rq = (struct dm_ulog_request *)cn->data;
			struct nlmsghdr *rh = (struct nlmsghdr *)sbuf;
			struct cn_msg *rc = NLMSG_DATA(rh);
			struct dm_ulog_request *rr = (struct dm_ulog_request *)rc->data;
			int error;

			requests++;
			by_type[DM_ULOG_REQUEST_TYPE(rq->request_type)]++;
			memcpy(rr, rq, sizeof(*rr));
			size_t size = answer(rq, rr->data, &error);
			rr->error = error;
			rr->data_size = (uint32_t)size;
			rc->id.idx = CN_IDX_DM;
			rc->id.val = CN_VAL_DM_USERSPACE_LOG;
			rc->seq = rq->seq;
			rc->ack = 0;
			rc->len = (uint16_t)(sizeof(*rr) + size);
			rc->flags = 0;
			rh->nlmsg_len = (uint32_t)(HDRS + sizeof(*rr) + size);
			rh->nlmsg_type = NLMSG_DONE;
			rh->nlmsg_flags = 0;
			rh->nlmsg_seq = rq->seq;
			rh->nlmsg_pid = addr.nl_pid;
			memset((char *)rh + rh->nlmsg_len, 0, NLMSG_ALIGN(rh->nlmsg_len) - rh->nlmsg_len);
			struct sockaddr_nl to = { .nl_family = AF_NETLINK };
			if (sendto(fd, sbuf, NLMSG_ALIGN(rh->nlmsg_len), 0, (struct sockaddr *)&to,
				   sizeof(to)) < 0)
				perror("ulog-null: send");
		}
	}
	print_counts();
	return 0;
}
