/*
 * A Starling player in C: joins a broadcast through the SDK's C API, writes the
 * stream's bytes to stdout or a file, and prints the viewer's counters on stderr at the
 * end.
 *
 * Build (from the repository root):
 *   cargo build --release -p starling-sdk-ffi
 *   cc -O2 -o starling-player examples/c/player.c -Iclient-sdk/ffi/include \
 *      -Ltarget/release -lstarling_sdk_ffi -Wl,-rpath,"$PWD/target/release"
 * Run:
 *   ./starling-player --control-url http://127.0.0.1:7000 --broadcast ID -o out.ts --seconds 20
 *   ./starling-player --broadcast ID | ffplay -
 *
 * Exit status: 0 after a normal end (duration reached, broadcast ended, Ctrl-C),
 * 1 on an error, 2 on bad arguments.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime with -std=c11 */

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "starling.h"

static volatile sig_atomic_t interrupted = 0;

static void on_signal(int sig) {
    (void)sig;
    interrupted = 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s --broadcast ID [--control-url URL] [--ca-file PEM]\n"
            "          [--insecure-plaintext] [--dataplane HOST:PORT]\n"
            "          [--credential JWT] [--no-relay] [--target-lag-ms MS]\n"
            "          [-o PATH|-] [--seconds N]\n",
            argv0);
}

/* Reports a failed call with the library's message. */
static int fail(const char *what, StarlingStatus s) {
    fprintf(stderr, "starling-player: %s: %s: %s\n", what, starling_status_name(s),
            starling_last_error());
    return 1;
}

int main(int argc, char **argv) {
    StarlingConfig config = starling_config_default();
    const char *output = "-";
    double seconds = 0; /* 0 = until the stream ends or Ctrl-C */

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--no-relay") == 0) {
            config.relay = false;
            continue;
        }
        if (strcmp(a, "--insecure-plaintext") == 0) {
            config.insecure_plaintext = true;
            continue;
        }
        if (val == NULL) {
            usage(argv[0]);
            return 2;
        }
        if (strcmp(a, "--broadcast") == 0) {
            config.broadcast_id = val;
        } else if (strcmp(a, "--control-url") == 0) {
            config.control_url = val;
        } else if (strcmp(a, "--ca-file") == 0) {
            config.ca_file = val;
        } else if (strcmp(a, "--dataplane") == 0) {
            config.dataplane_addr = val;
        } else if (strcmp(a, "--credential") == 0) {
            config.credential = val;
        } else if (strcmp(a, "--target-lag-ms") == 0) {
            config.target_lag_ms = (uint32_t)strtoul(val, NULL, 10);
        } else if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) {
            output = val;
        } else if (strcmp(a, "--seconds") == 0) {
            seconds = strtod(val, NULL);
        } else {
            usage(argv[0]);
            return 2;
        }
        i++;
    }
    if (config.broadcast_id == NULL) {
        usage(argv[0]);
        return 2;
    }

    FILE *out = stdout;
    if (strcmp(output, "-") != 0) {
        out = fopen(output, "wb");
        if (out == NULL) {
            fprintf(stderr, "starling-player: cannot create %s: %s\n", output, strerror(errno));
            return 1;
        }
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
#ifdef SIGPIPE
    signal(SIGPIPE, SIG_IGN); /* a closed pipe shows as a write error instead */
#endif

    StarlingViewer *viewer = NULL;
    StarlingStatus s = starling_viewer_new(&config, &viewer);
    if (s != STARLING_OK) {
        return fail("starling_viewer_new", s);
    }
    s = starling_viewer_start(viewer);
    if (s != STARLING_OK) {
        int rc = fail("starling_viewer_start", s);
        starling_viewer_free(viewer);
        return rc;
    }
    char url[256];
    if (starling_viewer_local_url(viewer, url, sizeof url) == STARLING_OK) {
        fprintf(stderr, "starling-player: playing broadcast %s (also at %s)\n",
                config.broadcast_id, url);
    }

    int rc = 0;
    static uint8_t buf[64 * 1024];
    const double start = now_s();
    for (;;) {
        if (interrupted) {
            fprintf(stderr, "starling-player: interrupted\n");
            break;
        }
        if (seconds > 0 && now_s() - start >= seconds) {
            break;
        }
        size_t n = 0;
        s = starling_viewer_read(viewer, buf, sizeof buf, 200, &n);
        if (s == STARLING_TIMEOUT) {
            continue;
        }
        if (s == STARLING_END_OF_STREAM) {
            fprintf(stderr, "starling-player: the stream ended\n");
            break;
        }
        if (s != STARLING_OK) {
            rc = fail("starling_viewer_read", s);
            break;
        }
        if (fwrite(buf, 1, n, out) != n || fflush(out) != 0) {
            fprintf(stderr, "starling-player: writing the output: %s\n", strerror(errno));
            rc = 1;
            break;
        }
    }

    s = starling_viewer_stop(viewer);
    if (s != STARLING_OK) {
        fail("starling_viewer_stop", s);
    }
    StarlingStats st;
    if (starling_viewer_stats(viewer, &st) == STARLING_OK) {
        fprintf(stderr,
                "starling-player: read %llu bytes; received %llu bytes in %llu chunks "
                "(%llu from the data plane, %llu from peers, peer share %.2f); "
                "uploaded %llu bytes; played %llu chunks, skipped %llu, continuity %.4f; "
                "stalls %llu (%llu ms); startup %lld ms; lag %lld ms; "
                "chunks verified %llu, bad %llu; reconnects %llu, rejoins %llu\n",
                (unsigned long long)st.bytes_read, (unsigned long long)st.bytes_received,
                (unsigned long long)st.chunks_received,
                (unsigned long long)st.bytes_from_server,
                (unsigned long long)st.bytes_from_peers, st.peer_share,
                (unsigned long long)st.bytes_uploaded, (unsigned long long)st.chunks_played,
                (unsigned long long)st.chunks_skipped, st.continuity,
                (unsigned long long)st.stalls, (unsigned long long)st.stall_time_ms,
                (long long)st.startup_ms, (long long)st.lag_ms,
                (unsigned long long)st.chunks_verified, (unsigned long long)st.bad_chunks,
                (unsigned long long)st.reconnects, (unsigned long long)st.rejoins);
    }
    starling_viewer_free(viewer);
    if (out != stdout && fclose(out) != 0) {
        fprintf(stderr, "starling-player: closing %s: %s\n", output, strerror(errno));
        rc = 1;
    }
    return rc;
}
