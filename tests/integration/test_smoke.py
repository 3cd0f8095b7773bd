import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def test_simple_both_protocols(server):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    for mod, url in ((grpcclient, server.grpc_url), (httpclient, server.http_url)):
        c = mod.InferenceServerClient(url)
        i0 = mod.InferInput("INPUT0", [1, 16], "INT32")
        i0.set_data_from_numpy(a)
        i1 = mod.InferInput("INPUT1", [1, 16], "INT32")
        i1.set_data_from_numpy(b)
        r = c.infer("simple", [i0, i1])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
